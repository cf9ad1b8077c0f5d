"""Weight-only int8: the quantization maths, the kernel wrapper, its effect on a model, streamed int8 = resident
int8, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.generate.decode import greedy
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs
from cpmctl.generate.offload import load_offloaded
from cpmctl.generate.plan import plan_memory
from cpmctl.generate.quant import (
    Int8Linear,
    check_int8_support,
    dequantize_weight,
    quantize_model,
    quantize_weight,
)
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_native
from tests.conftest import run_cli, tiny_config


@pytest.mark.parametrize("in_features", [64, 60, 13, 104])  # all but 64: padded to a multiple of 16
def test_quantize_weight_error_is_half_a_step(in_features):
    torch.manual_seed(0)
    w = torch.randn(24, in_features) * torch.linspace(0.01, 3.0, 24)[:, None]  # rows of very different ranges
    q, scale = quantize_weight(w, torch.bfloat16)
    assert q.dtype == torch.int8 and q.shape == (24, -(-in_features // 16) * 16) and scale.dtype == torch.bfloat16
    assert torch.all(q[:, in_features:] == 0)
    error = (dequantize_weight(q, scale, in_features) - w).abs()
    assert torch.all(error <= scale.float()[:, None] / 2 + 1e-6)  # rounding against the stored (bf16) scale
    assert q.abs().max() <= 127


@pytest.mark.parametrize("in_features", [64, 60, 104, 3735 // 5])  # 104, 747: where the raw kernel is wrong
def test_int8_linear_matches_its_dequantized_weight(in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 40, bias=False)
    module = Int8Linear.from_linear(linear, torch.bfloat16)
    x = torch.randn(2, 5, in_features)
    y = module(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    w = dequantize_weight(module.weight_int8, module.scale, in_features)
    reference = F.linear(x.bfloat16().float(), w)  # bf16 activations, exact int8 weights
    assert torch.allclose(y, reference, rtol=2e-2, atol=2e-2)
    exact = F.linear(x, linear.weight)
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()


def test_int8_model_stays_close_to_fp32():
    cfg = tiny_config(300, num_layers=3)
    model = build_model(cfg, seed=1).eval()
    quantized = quantize_model(build_model(cfg, seed=1).eval())
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.encoder.modules())
    inputs = build_inputs(model, [[6, 20, 31, 42, 53, 64, 75, 80, 91, 102]])
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        a, b = model(*args), quantized(*args)
    relative = ((a - b).norm() / a.norm()).item()
    assert relative < 0.05
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agreement > 0.8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab):
    from cpmctl.model.tokenizer import CPMAntTokenizer

    cfg = tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size, num_layers=4, dim_ff=100)  # 100: padded w_out
    return save_native(build_model(cfg, seed=5), tmp_path_factory.mktemp("quant") / "ckpt", vocab=tiny_vocab)


def test_streamed_int8_equals_resident_int8(checkpoint):
    resident = quantize_model(load_model(checkpoint)[0])
    config = resident.config
    minimum = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int8").minimum_bytes
    offloaded = load_offloaded(checkpoint, budget=minimum + minimum // 4, quantize="int8")
    try:
        assert offloaded.plan.streamed and offloaded.plan.quantize == "int8"
        inputs = build_inputs(resident, [[6, 20, 31, 42], [6, 90]])
        args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
        with torch.no_grad():
            assert torch.equal(resident(*args), offloaded.model(*args))
        cfg = GenerationConfig(decode="greedy", max_new_tokens=10)
        assert greedy(resident, inputs, cfg) == greedy(offloaded.model, inputs, cfg)
    finally:
        offloaded.close()


def test_unsupported_devices_are_refused(capsys):
    with pytest.raises(CpmctlError, match="not supported on device 'meta'"):
        check_int8_support(torch.device("meta"), torch.float32)
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, *["model", "info", "10b", "--quantize", "int8", "--device", "cuda"])
        assert code == 2 and "no CUDA device" in err




def test_cli_generate_int8(checkpoint, capsys):
    base = ["generate", "今天天气", "--model", str(checkpoint), "--device", "cpu", "--decode", "greedy",
            "--max-new-tokens", "8", "--json"]
    code, out, err = run_cli(capsys, *base + ["--quantize", "int8"])
    assert code == 0, err
    ids = json.loads(out)["token_ids"]
    assert len(ids) >= 1 and "int8" in err
    code, _, err = run_cli(capsys, *base + ["--quantize", "int4"])
    assert code == 2 and "--quantize must be one of int8" in err
    code, _, err = run_cli(capsys, *base[:-1] + ["--quantize", "int8", "--adapter", str(checkpoint)])
    assert code == 2 and "merge the adapter first" in err
