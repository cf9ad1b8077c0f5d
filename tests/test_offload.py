"""Memory-limited execution on the CPU device: same outputs as the resident model, accounting within the budget,
lazy loading, clear errors. (tests/test_offload_cuda.py-style checks run in bench/memory.py and below when CUDA is
present.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from cpmctl import CpmctlError
from cpmctl.generate.decode import beam_search, greedy, sample
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs
from cpmctl.model.mapped import MappedCheckpoint
from cpmctl.generate.offload import load_offloaded, materialized_weight_bytes
from cpmctl.generate.plan import GB, plan_memory
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import convert, load_model, save_native, save_original
from tests.conftest import run_cli, tiny_config

PROMPTS = [[6, 20, 31, 42, 53, 64, 75], [6, 90, 81]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab):
    from cpmctl.model.tokenizer import CPMAntTokenizer

    cfg = tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size, num_layers=5)
    model = build_model(cfg, seed=3)
    return save_native(model, tmp_path_factory.mktemp("offload") / "ckpt", vocab=tiny_vocab)


def cpu_budget(config, resident_blocks: float) -> int:
    """A CPU budget that leaves room for `resident_blocks` blocks beside the fixed weights and staging."""
    plan = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None)
    return plan.minimum_bytes + int((resident_blocks - 1) * plan.block_bytes[0])


def decode_all(model):
    inputs = build_inputs(model, PROMPTS)
    return (
        greedy(model, inputs, GenerationConfig(decode="greedy", max_new_tokens=12)),
        beam_search(model, inputs, GenerationConfig(decode="beam", beam_size=3, max_new_tokens=6)),
        sample(model, inputs, GenerationConfig(decode="sample", max_new_tokens=8, seed=7)),
    )


@pytest.mark.parametrize("resident_blocks", [1, 2.5, 4])  # one buffer; two buffers + 0 resident; some resident
def test_streamed_outputs_equal_resident_outputs(checkpoint, resident_blocks):
    reference, _ = load_model(checkpoint)
    config = reference.config
    offloaded = load_offloaded(checkpoint, budget=cpu_budget(config, resident_blocks), batch_rows=6)
    try:
        assert offloaded.plan.streamed, "the budget must force streaming"
        expected_slots = 1 if resident_blocks == 1 else 2
        assert offloaded.plan.num_slots == expected_slots
        inputs = build_inputs(reference, PROMPTS)
        args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
        with torch.no_grad():  # as in decoding (with autograd on, SDPA may pick another kernel)
            assert torch.equal(reference(*args), offloaded.model(*args))
        assert decode_all(reference) == decode_all(offloaded.model)
        assert offloaded.streamer.loads >= len(offloaded.plan.streamed)
    finally:
        offloaded.close()


def test_accounting_never_exceeds_the_budget(checkpoint):
    config = MappedCheckpoint(checkpoint).config
    budget = cpu_budget(config, 3)
    offloaded = load_offloaded(checkpoint, budget=budget)
    model, plan, streamer = offloaded.model, offloaded.plan, offloaded.streamer
    measured = []

    def measure(block, args):  # runs after the streamer's own pre-hook has bound the block
        measured.append(materialized_weight_bytes(model, streamer))
        bound = sum(p.device.type != "meta" for b in model.encoder.layers if b.layer in plan.streamed
                    for p in b.parameters())
        assert bound == sum(1 for _ in block.parameters())  # only the running streamed block is bound

    hooks = [model.encoder.layers[i].register_forward_pre_hook(measure) for i in plan.streamed]
    try:
        decode_all(model)
    finally:
        for h in hooks:
            h.remove()
        offloaded.close()
    assert measured and max(measured) <= plan.weight_bytes
    assert offloaded.ledger.peak <= plan.charged_bytes <= budget
    assert offloaded.ledger.by_kind["staging"] == 0  # every staging charge was released
    for i in plan.streamed:  # between uses, streamed blocks hold no memory
        assert all(p.device.type == "meta" for p in model.encoder.layers[i].parameters())


def test_budget_below_minimum_fails_before_reading_weights(checkpoint, monkeypatch):
    def no_reads(self, key, dtype):
        raise AssertionError("a weight was read before the budget was checked")

    monkeypatch.setattr(MappedCheckpoint, "folded", no_reads)
    config = MappedCheckpoint(checkpoint).config
    minimum = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None).minimum_bytes
    with pytest.raises(CpmctlError, match=f"below the minimum of {minimum / GB:.3g} GB"):
        load_offloaded(checkpoint, budget=minimum - 1)


def test_original_and_fp16_checkpoints_load_lazily(checkpoint, tmp_path):
    reference, _ = load_model(checkpoint)
    pt, _ = save_original(reference, tmp_path / "orig" / "model.pt", dtype=torch.float16)
    expected, _ = load_model(pt, dtype=torch.float32)  # folds from fp16, as the lazy path must
    budget = cpu_budget(reference.config, 2.5)
    offloaded = load_offloaded(pt, budget=budget)
    try:
        assert offloaded.plan.streamed
        assert decode_all(expected) == decode_all(offloaded.model)
    finally:
        offloaded.close()


@pytest.mark.parametrize("source", [torch.float32, torch.float16])
def test_fold_into_writes_the_folded_tensor(checkpoint, tmp_path, source):
    """What a streamed CPU block is filled with (fold_into, one pass into its buffer) equals folded() bit for bit,
    for every tensor of the checkpoint, from an fp32 and an fp16 file, into fp32, bf16 and fp16 buffers; and a
    streamed fp16 original-format checkpoint gives the resident model's logits."""
    path = checkpoint
    if source == torch.float16:
        path, _ = save_original(load_model(checkpoint)[0], tmp_path / "orig" / "model.pt", dtype=torch.float16)
    ckpt = MappedCheckpoint(path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for key in ckpt.keys():
            out = torch.full(ckpt.raw(key).shape, float("nan"), dtype=dtype)
            ckpt.fold_into(key, out)
            assert torch.equal(out, ckpt.folded(key, dtype)), (key, dtype)
    reference, _ = load_model(path, dtype=torch.float32)
    offloaded = load_offloaded(path, budget=cpu_budget(reference.config, 1.5), batch_rows=6)
    try:
        assert offloaded.plan.streamed
        inputs = build_inputs(reference, PROMPTS)
        args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
        with torch.no_grad():
            assert torch.equal(reference(*args), offloaded.model(*args))
    finally:
        offloaded.close()


def test_mapped_tensors_are_views_not_copies(checkpoint):
    ckpt = MappedCheckpoint(checkpoint)
    t = ckpt.raw("input_embedding.weight")
    assert ckpt.is_mapped(t)
    assert not ckpt.is_mapped(ckpt.folded("input_embedding.weight", torch.float32))


def test_hf_layout_is_refused_with_a_hint(checkpoint, tmp_path):
    hf = convert(checkpoint, "hf", tmp_path / "hf")
    with pytest.raises(CpmctlError, match="convert --to native"):
        load_offloaded(hf, budget=None)


def test_loader_takes_a_finished_plan(checkpoint):
    """load_planned follows the plan it is given (the one plan_generation makes for `generate`), and refuses a plan
    sized for another config or device."""
    from cpmctl.generate.offload import load_planned

    config = MappedCheckpoint(checkpoint).config
    plan = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=cpu_budget(config, 2.5), batch_rows=6)
    offloaded = load_planned(checkpoint, plan, device="cpu")
    try:
        assert offloaded.plan is plan and offloaded.plan.streamed
        reference, _ = load_model(checkpoint)
        assert decode_all(reference) == decode_all(offloaded.model)
    finally:
        offloaded.close()
    other = plan_memory(tiny_config(config.vocab_size, num_layers=3), device_type="cpu", dtype=torch.float32,
                        budget=None)
    with pytest.raises(CpmctlError, match="made for another model config"):
        load_planned(checkpoint, other, device="cpu")
    on_cuda = plan_memory(config, device_type="cuda", dtype=torch.float32, budget=None)
    with pytest.raises(CpmctlError, match="the memory plan is for cuda"):
        load_planned(checkpoint, on_cuda, device="cpu")


LOAD_PEAK_SCRIPT = """
import json, sys, threading, time
import torch
from cpmctl.model.mapped import MappedCheckpoint
from cpmctl.generate.offload import load_offloaded
from cpmctl.model.checkpoint import load_model

def rss():  # anonymous + file-backed pages of this process
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))

path, how = sys.argv[1], sys.argv[2]
MappedCheckpoint(path)  # warm-up: torch's one-time allocations are not the weights
base, peak, done = rss(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
model = load_offloaded(path, budget=None).model if how == "lazy" else load_model(path)[0]
done[0] = True
thread.join()
print(json.dumps(max(peak[0], rss()) - base))
"""


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak host memory (resident pages, sampled every ms) while loading ~48 MB of weights: one copy for the lazy
    path; the eager loader, measured the same way, holds two (the file's pages and the folded copy)."""
    cfg = tiny_config(4000, dim_model=512, dim_ff=1024, num_layers=6, num_heads=8, dim_head=64)
    model = build_model(cfg, seed=0)
    path = save_native(model, tmp_path / "big")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    procs = {how: subprocess.Popen([sys.executable, "-c", LOAD_PEAK_SCRIPT, str(path), how], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for how in ("lazy", "eager")}
    peaks = {}
    for how, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        peaks[how] = int(out.strip().splitlines()[-1])
    assert peaks["lazy"] < 1.3 * weight_bytes, (peaks, weight_bytes)
    assert peaks["eager"] > 1.7 * weight_bytes, (peaks, weight_bytes)  # the measurement tells one copy from two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident_blocks", [1, 2.5])
def test_cuda_streaming_is_exact_and_within_budget(checkpoint, resident_blocks):
    device = torch.device("cuda", torch.cuda.current_device())
    reference, _ = load_model(checkpoint, device=device)
    expected = decode_all(reference)
    config = reference.config
    del reference
    shape = dict(batch_rows=6, prefill_length=32 + 7, capacity=32 + 7 + 16)  # decode_all's largest use
    plan = plan_memory(config, device_type="cuda", dtype=torch.float32, budget=None, **shape)
    budget = plan.minimum_bytes + int((resident_blocks - 1) * plan.block_bytes[0])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    offloaded = load_offloaded(checkpoint, device=device, budget=budget, **shape)
    try:
        assert offloaded.plan.streamed
        assert decode_all(offloaded.model) == expected
        torch.cuda.synchronize(device)
        assert torch.cuda.max_memory_allocated(device) <= budget
    finally:
        offloaded.close()


# ----- the CLI -------------------------------------------------------------------------------------------------


def test_cli_generate_with_memory_limit_equals_without(checkpoint, capsys):
    base = ["generate", "今天天气", "--model", str(checkpoint), "--device", "cpu", "--decode", "greedy",
            "--max-new-tokens", "10", "--json"]
    code, plain, _ = run_cli(capsys, *base)
    assert code == 0
    config = MappedCheckpoint(checkpoint).config
    limit = cpu_budget(config, 2.5) / GB
    code, limited, err = run_cli(capsys, *base + ["--memory-limit", f"{limit:.9f}"])
    assert code == 0, err
    assert "streamed" in err
    assert json.loads(limited)["token_ids"] == json.loads(plain)["token_ids"]
    # the run's summary on stderr: tokens, speed, peak memory (stdout holds only the JSON result)
    tokens = len(json.loads(limited)["token_ids"])
    assert re.search(rf"generated {tokens} tokens for 1 prompt in [\d.]+ s \([\d.]+ tokens/s.*peak RSS [\d,]+ MB", err)


def test_cli_rejects_bad_memory_limits(checkpoint, capsys):
    base = ["generate", "今天天气", "--model", str(checkpoint), "--device", "cpu", "--decode", "greedy"]
    code, _, err = run_cli(capsys, *base + ["--memory-limit", "-1"])
    assert code == 2 and "positive" in err
    code, _, err = run_cli(capsys, *base + ["--memory-limit", "0.00001"])
    assert code == 2 and "below the minimum of" in err
    code, _, err = run_cli(capsys, *base + ["--memory-limit", "100000"])
    assert code == 2 and "more than cpu has" in err
