"""The memory planner: what it counts matches the real tensors, budgets partition the blocks, bad limits fail."""

from __future__ import annotations

import json

import pytest
import torch

from cpmctl import CpmctlError
from cpmctl.cli.app import main
from cpmctl.generate.plan import (
    GB,
    block_layout,
    fixed_bytes,
    format_blocks,
    generation_shape,
    kv_cache_bytes,
    layout_bytes,
    memory_limit_bytes,
    plan_memory,
)
from cpmctl.model.ant import KVCache, build_model
from cpmctl.model.config import resolve_config
from tests.conftest import tiny_config


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_counts_match_real_tensors():
    cfg = tiny_config(300, num_layers=3)
    model = build_model(cfg, seed=0)
    block_names = {n for n, _ in model.named_parameters() if n.startswith("encoder.layers.")}
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in block_names)
    assert fixed_bytes(cfg, torch.float32) == fixed
    for i, block in enumerate(model.encoder.layers):
        layout = block_layout(cfg, i, torch.float32, None)
        assert {e.name for e in layout} == {n for n, _ in block.named_parameters()}
        real = sum(p.numel() * p.element_size() for p in block.parameters())
        assert real <= layout_bytes(layout) < real + 512 * len(layout)
    cache = KVCache.allocate(model, 3, 50)
    real_cache = sum(t.numel() * t.element_size() for t in cache.k + cache.v if t is not None)
    real_cache += sum(t.numel() * t.element_size() for t in (cache.segment, cache.context, cache.span))
    assert kv_cache_bytes(cfg, torch.float32, 3, 50) == real_cache


def test_no_budget_keeps_everything_resident():
    cfg = tiny_config(300, num_layers=4)
    plan = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=None)
    assert plan.resident == [0, 1, 2, 3] and plan.streamed == [] and plan.num_slots == 0


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_budgets_partition_blocks_and_fit(device_type):
    cfg = tiny_config(300, num_layers=6)
    full = plan_memory(cfg, device_type=device_type, dtype=torch.float32, budget=None)
    block = full.block_bytes[0]
    previous = -1
    for extra_blocks in (1, 2, 2.5, 3, 4, 5, 7):
        budget = plan_memory(cfg, device_type=device_type, dtype=torch.float32, budget=None).minimum_bytes
        budget += int((extra_blocks - 1) * block)
        plan = plan_memory(cfg, device_type=device_type, dtype=torch.float32, budget=budget)
        assert sorted(plan.resident + plan.streamed) == list(range(6))
        assert plan.charged_bytes <= budget
        assert len(plan.resident) >= previous  # more memory never means fewer resident blocks
        previous = len(plan.resident)
        if plan.streamed:
            assert plan.num_slots in (1, 2) and plan.slot_bytes == block
    assert previous == 6


def test_one_buffer_at_the_minimum_and_the_minimum_is_stated():
    cfg = tiny_config(300, num_layers=4)
    minimum = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=None).minimum_bytes
    plan = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=minimum)
    assert plan.num_slots == 1 and plan.resident == [] and len(plan.streamed) == 4
    with pytest.raises(CpmctlError, match=f"minimum of {minimum / GB:.3g} GB"):
        plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=minimum - 1)


def test_cache_and_activations_are_charged_on_cuda_not_on_cpu():
    cfg = tiny_config(300, num_layers=4)
    small = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=None, batch_rows=1, capacity=64)
    large = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=None, batch_rows=8, capacity=512,
                        prefill_length=256)
    assert large.cache_bytes > small.cache_bytes and large.activation_bytes > small.activation_bytes
    assert large.minimum_bytes - small.minimum_bytes == (
        large.cache_bytes + large.activation_bytes - small.cache_bytes - small.activation_bytes
    )
    cpu_small = plan_memory(cfg, device_type="cpu", dtype=torch.float32, budget=None, batch_rows=1, capacity=64)
    cpu_large = plan_memory(cfg, device_type="cpu", dtype=torch.float32, budget=None, batch_rows=8, capacity=512)
    assert cpu_small.minimum_bytes == cpu_large.minimum_bytes


def test_pruned_config_keeps_largest_blocks_and_skips_empty_ones():
    cfg = resolve_config("mini-3b")
    full = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=None)
    empty = [i for i in range(cfg.num_layers) if not cfg.has_attention(i) and not cfg.has_ffn(i)]
    assert all(full.block_bytes[i] == 0 for i in empty) and not set(empty) & set(full.resident)
    budget = full.minimum_bytes + 4 * max(full.block_bytes)
    plan = plan_memory(cfg, device_type="cuda", dtype=torch.float32, budget=budget)
    assert plan.streamed and not set(empty) & set(plan.streamed)
    assert min(plan.block_bytes[i] for i in plan.resident) >= max(plan.block_bytes[i] for i in plan.streamed)


def test_int8_blocks_are_about_a_quarter_of_fp32():
    cfg = resolve_config("10b")
    fp32 = layout_bytes(block_layout(cfg, 0, torch.float32, None))
    int8 = layout_bytes(block_layout(cfg, 0, torch.float32, torch.bfloat16))
    assert 0.24 < int8 / fp32 < 0.26


def test_memory_limit_bytes_rejects_bad_limits():
    cpu = torch.device("cpu")
    assert memory_limit_bytes(None, cpu) is None
    assert memory_limit_bytes(2, cpu) == 2 * GB
    for bad in (-1, 0, float("nan")):
        with pytest.raises(CpmctlError, match="positive"):
            memory_limit_bytes(bad, cpu)
    with pytest.raises(CpmctlError, match="more than cpu has"):
        memory_limit_bytes(10**6, cpu)


def test_generation_shape_matches_decode_sizes():
    cfg = tiny_config(300)
    assert generation_shape(cfg, [5, 9, 3], 2, "beam", 3, 10) == (2 * 3 + 2, 32 + 9, 32 + 9 + 13)
    assert generation_shape(cfg, [5], 8, "greedy", 3, 10) == (1, 37, 50)


def test_format_blocks():
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_blocks([]) == "-"


def test_model_info_prints_the_plan(capsys):
    code, out, _ = run_cli(["model", "info", "10b", "--memory-limit", "4", "--device", "cpu", "--json"], capsys)
    assert code == 0
    plan = json.loads(out)["memory_plan"]
    assert plan["budget"] == 4 * GB and plan["charged_bytes"] <= 4 * GB
    assert len(plan["resident"]) + len(plan["streamed"]) == 48 and plan["streamed"]
    code, out, _ = run_cli(["model", "info", "10b", "--memory-limit", "4", "--device", "cpu"], capsys)
    assert code == 0 and "streamed blocks" in out and "minimum limit" in out


def test_model_info_rejects_bad_limits(capsys):
    code, _, err = run_cli(["model", "info", "10b", "--memory-limit", "0.5", "--device", "cpu"], capsys)
    assert code == 2 and "below the minimum of" in err
    code, _, err = run_cli(["model", "info", "10b", "--memory-limit", "-4", "--device", "cpu"], capsys)
    assert code == 2 and "positive" in err
    code, _, err = run_cli(["model", "info", "10b", "--memory-limit", "100000", "--device", "cpu"], capsys)
    assert code == 2 and "more than cpu has" in err


def test_plan_generation_is_plan_memory_of_the_generation_shape():
    from cpmctl.generate.plan import plan_generation
    from cpmctl.model.generation_config import GenerationConfig

    cfg = resolve_config("mini-3b")
    cpu = torch.device("cpu")
    decoding = GenerationConfig(decode="beam", beam_size=2, max_new_tokens=20)
    plan = plan_generation(cfg, [12, 30, 7], decoding=decoding, batch_size=2, device=cpu, dtype=torch.float32,
                           memory_limit_gb=4, quantize="int8")
    rows, prefill, capacity = generation_shape(cfg, [12, 30, 7], 2, "beam", 2, 20)
    assert plan == plan_memory(cfg, device_type="cpu", dtype=torch.float32, budget=4 * GB, quantize="int8",
                               batch_rows=rows, prefill_length=prefill, capacity=capacity)
    assert plan.torch_dtype == torch.float32
    greedy = GenerationConfig(decode="greedy")
    for kwargs, message in [
        (dict(quantize="int2"), "--quantize must be one of int8"),
        (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
        (dict(batch_size=0, batch_option="--batch-rows"), "--batch-rows must be >= 1, got 0"),
        (dict(decoding=GenerationConfig(max_new_tokens=0)), "--max-new-tokens must be >= 1"),
        (dict(memory_limit_gb=-1), "positive"),
        (dict(memory_limit_gb=0.01), "below the minimum of"),
    ]:
        args = dict(decoding=greedy, batch_size=1, device=cpu, dtype=torch.float32, memory_limit_gb=4) | kwargs
        with pytest.raises(CpmctlError, match=message):
            plan_generation(cfg, [12], **args)


def test_model_info_and_generate_make_the_same_plan(capsys):
    """`model info --batch-rows R --prompt-tokens N` is the plan of greedy generation of R prompts of N tokens."""
    from cpmctl.generate.plan import plan_generation
    from cpmctl.model.generation_config import GenerationConfig

    code, out, _ = run_cli(["model", "info", "mini-3b", "--memory-limit", "3", "--device", "cpu", "--batch-rows", "3",
                            "--prompt-tokens", "40", "--max-new-tokens", "16", "--json"], capsys)
    assert code == 0
    plan = plan_generation(resolve_config("mini-3b"), [40, 40, 40], decoding=GenerationConfig(decode="greedy",
                           max_new_tokens=16), batch_size=8, device=torch.device("cpu"), dtype=torch.float32,
                           memory_limit_gb=3)
    assert json.loads(out)["memory_plan"] == json.loads(json.dumps(plan.to_dict()))
    code, _, err = run_cli(["model", "info", "10b", "--memory-limit", "4", "--device", "cpu", "--batch-rows", "0"],
                           capsys)
    assert code == 2 and "--batch-rows must be >= 1, got 0" in err
