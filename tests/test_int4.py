"""int4 weight-only linears (generate/int4.py): the kernel's product equals a hand dequantisation of the stored
nibbles, resident and streamed runs agree, the planner counts the bytes that are materialised, bad shapes and
devices are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.generate.decode import greedy
from cpmctl.generate.int4 import (
    GROUP_SIZE,
    Int4Linear,
    check_int4_support,
    dequantize_int4,
    quantize_int4,
    unpack_codes,
)
from cpmctl.generate.offload import load_offloaded, materialized_weight_bytes
from cpmctl.generate.plan import block_layout, layout_bytes, plan_memory
from cpmctl.generate.quant import quantize_model
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_native
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs
from tests.conftest import run_cli, tiny_config

INT4_DIMS = dict(dim_model=128, dim_ff=256, num_heads=2, dim_head=64)  # every linear's input a multiple of 128


def hand_dequantised(codes: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """Written out element by element from the format (not with int4.py's helpers): nibble j of row i is the high
    half of byte j // 2 when j is even; w = (q - 8) * scale + zero of group j // 128."""
    out_features, half = codes.shape
    w = torch.empty(out_features, 2 * half)
    for i in range(out_features):
        for j in range(2 * half):
            byte = int(codes[i, j // 2])
            q = byte >> 4 if j % 2 == 0 else byte & 15
            scale, zero = (float(v) for v in scales_zeros[j // GROUP_SIZE, i])
            w[i, j] = (q - 8) * scale + zero
    return w


def test_quantize_int4_codes_and_scales():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    codes, scales_zeros = quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 128)
    assert scales_zeros.dtype == torch.bfloat16 and scales_zeros.shape == (2, 16, 2)
    dequantised = hand_dequantised(codes, scales_zeros)
    assert torch.equal(dequantised, dequantize_int4(codes, scales_zeros))
    q = unpack_codes(codes)
    assert q.min() == 0 and q.max() == 15  # asymmetric: each group spans the whole code range
    # Within half a step of the group's scale (plus the bf16 rounding of the stored zero).
    scale = scales_zeros[..., 0].float().t().repeat_interleave(GROUP_SIZE, dim=1)
    zero = scales_zeros[..., 1].float().t().repeat_interleave(GROUP_SIZE, dim=1)
    assert ((dequantised - w).abs() <= scale / 2 + zero.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("shape", [(16, 128), (48, 256), (96, 384)])
def test_int4_linear_matches_the_hand_dequantised_reference(rows, shape):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(rows + out_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    module = Int4Linear.from_linear(linear)
    codes, scales_zeros = quantize_int4(linear.weight.detach())
    assert torch.equal(module.scales_zeros, scales_zeros)
    x = torch.randn(rows, in_features, generator=gen)
    reference = F.linear(x.to(torch.bfloat16).float(), hand_dequantised(codes, scales_zeros))  # fp32 product
    y = module(x)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # The kernel sums in fp32 and rounds its output to bf16 (the activation dtype): half an ulp of bf16, 2^-9.
    assert ((y - reference).abs() <= reference.abs() * 2**-8 + 1e-3 * reference.abs().max()).all()
    assert torch.equal(module(x[None])[0], y)  # 3-D inputs take the same path
    # A wrong nibble order would not pass: swapping the halves of every byte changes the product.
    swapped = ((codes & 15) << 4) | (codes >> 4)
    wrong = F.linear(x.to(torch.bfloat16).float(), dequantize_int4(swapped, scales_zeros))
    assert not torch.allclose(wrong, reference, rtol=2**-8, atol=1e-3 * reference.abs().max().item())


def int4_config(vocab_size: int, **overrides):
    return tiny_config(vocab_size, **{**INT4_DIMS, **overrides})


def test_int4_model_keeps_the_head_and_stays_close():
    cfg = int4_config(300, num_layers=3)
    model = build_model(cfg, seed=1).eval()
    quantized = quantize_model(build_model(cfg, seed=1).eval(), "int4")
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.encoder.modules())
    assert sum(isinstance(m, Int4Linear) for m in quantized.modules()) == 3 * 7
    assert quantized.input_embedding.weight.dtype == torch.float32  # the tied head stays in the model dtype
    inputs = build_inputs(model, [[6, 20, 31, 42, 53, 64, 75, 80, 91, 102]])
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        a, b = model(*args), quantized(*args)
    # Random weights, 4 bits: the error is real but bounded (docs/memory.md has a trained model's figures).
    assert ((a - b).norm() / a.norm()).item() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.5


def test_decode_step_of_an_int4_model_equals_its_forward():
    from tests.test_generate import _steps_of_both, _texts

    model = quantize_model(build_model(int4_config(341, num_layers=2), seed=4).eval(), "int4")
    for lengths in ([7], [3, 10]):
        for plain, fast in _steps_of_both(model, _texts(lengths, 2)):
            assert torch.equal(fast, plain), lengths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab):
    from cpmctl.model.tokenizer import CPMAntTokenizer

    cfg = int4_config(CPMAntTokenizer(tiny_vocab).vocab_size, num_layers=4)
    return save_native(build_model(cfg, seed=5), tmp_path_factory.mktemp("int4") / "ckpt", vocab=tiny_vocab)


def test_streamed_int4_equals_resident_int4_and_the_planner_counts_its_bytes(checkpoint):
    resident = quantize_model(load_model(checkpoint)[0], "int4")
    config = resident.config
    full = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int4")
    budget = full.minimum_bytes + int(2.5 * full.block_bytes[0])  # two buffers, one block resident, two streamed
    offloaded = load_offloaded(checkpoint, budget=budget, quantize="int4")
    try:
        plan, model = offloaded.plan, offloaded.model
        assert plan.streamed and plan.resident and plan.quantize == "int4"
        inputs = build_inputs(resident, [[6, 20, 31, 42], [6, 90]])
        args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
        with torch.no_grad():
            assert torch.equal(resident(*args), model(*args))
        cfg = GenerationConfig(decode="greedy", max_new_tokens=10)
        assert greedy(resident, inputs, cfg) == greedy(model, inputs, cfg)
        # The planner's bytes are those materialised: a resident block's tensors, entry by entry, and in all.
        layout = block_layout(config, plan.resident[0], torch.float32, torch.bfloat16, "int4", "cpu")
        block = model.encoder.layers[plan.resident[0]]
        tensors = dict(list(block.named_parameters()) + list(block.named_buffers()))
        assert {e.name: (e.shape, e.dtype, e.nbytes) for e in layout} == {
            n: (tuple(t.shape), t.dtype, t.numel() * t.element_size()) for n, t in tensors.items()}
        unaligned = plan.fixed_bytes + sum(sum(e.nbytes for e in block_layout(
            config, i, torch.float32, torch.bfloat16, "int4", "cpu")) for i in plan.resident)
        assert materialized_weight_bytes(model) == unaligned
        assert materialized_weight_bytes(model, offloaded.streamer) <= plan.weight_bytes
        assert offloaded.ledger.peak <= plan.charged_bytes <= budget
        assert offloaded.ledger.by_kind["staging"] == 0  # every staging charge was released
        # The streamed bytes: packed codes (half a byte a weight) + bf16 scales and zeros, half of int8's and less.
        d, ff = config.dim_model, config.dim_ff
        weights = 4 * d * d + 3 * d * ff
        linears = weights // 2 + weights // GROUP_SIZE * 4
        int4_block = sum(e.nbytes for e in layout)
        assert int4_block == linears + sum(t.numel() * 4 for n, t in tensors.items() if "layernorm" in n)
        int8_block = layout_bytes(block_layout(config, 0, torch.float32, torch.bfloat16, "int8", "cpu"))
        assert layout_bytes(layout) < 0.56 * int8_block
    finally:
        offloaded.close()


def test_bad_shapes_and_devices_are_one_line_errors(checkpoint, capsys, tiny_vocab, tmp_path):
    with pytest.raises(CpmctlError, match="not supported on device 'meta'"):
        check_int4_support(torch.device("meta"))
    with pytest.raises(CpmctlError, match=r"dim_model \(64\) to be a multiple of the group size 128"):
        quantize_model(build_model(tiny_config(300), seed=0).eval(), "int4")
    with pytest.raises(CpmctlError, match=r"dim_ff \(200\)"):
        plan_memory(int4_config(300, dim_ff=200), device_type="cpu", dtype=torch.float32, budget=None,
                    quantize="int4")
    from cpmctl.model.tokenizer import CPMAntTokenizer

    narrow = save_native(build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=0), tmp_path / "n",
                         vocab=tiny_vocab)
    code, _, err = run_cli(capsys, "generate", "今天天气", "--model", str(narrow), "--device", "cpu",
                           "--quantize", "int4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "multiple of the group size 128" in err


def test_cli_generate_int4_streamed_equals_resident(checkpoint, capsys):
    base = ["generate", "今天天气", "--model", str(checkpoint), "--device", "cpu", "--decode", "greedy",
            "--max-new-tokens", "8", "--json", "--quantize", "int4"]
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    assert "int4" in err
    config = load_model(checkpoint)[0].config
    minimum = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int4").minimum_bytes
    code, streamed, err = run_cli(capsys, *base + ["--memory-limit", f"{1.1 * minimum / 1e9:.9f}"])
    assert code == 0, err
    assert "streamed" in err
    assert json.loads(streamed)["token_ids"] == json.loads(out)["token_ids"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int4_resident_and_streamed_agree(checkpoint):
    device = torch.device("cuda", torch.cuda.current_device())
    resident = quantize_model(load_model(checkpoint, device=device)[0], "int4")
    inputs = {k: v.to(device) for k, v in build_inputs(resident, [[6, 20, 31, 42], [6, 90]]).items()}
    cfg = GenerationConfig(decode="greedy", max_new_tokens=10)
    expected = greedy(resident, inputs, cfg)
    config = resident.config
    full = plan_memory(config, device_type="cuda", dtype=torch.float32, budget=None, quantize="int4")
    offloaded = load_offloaded(checkpoint, device=device, budget=full.minimum_bytes + full.block_bytes[0],
                               quantize="int4")
    try:
        assert offloaded.plan.streamed
        assert greedy(offloaded.model, inputs, cfg) == expected
    finally:
        offloaded.close()
