"""int8: the quantization maths, the kernel wrappers (weight-only and int8-dynamic), their effect on a model,
streamed int8 = resident int8, the CLI choices and the errors."""

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
    QUANTIZE_CHOICES,
    DynamicInt8Linear,
    Int8Linear,
    check_dynamic_support,
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


def test_streamed_int8_blocks_are_quantized_once_into_a_deleted_scratch_file(checkpoint, tmp_path, monkeypatch):
    """CPU streaming with int8: the blocks come from a scratch file written at load and unlinked at once (nothing
    left in the directory), with the resident int8 model's logits; where no scratch file can be written, one
    warning and the per-use quantization, with the same logits."""
    from cpmctl.generate.block_source import MappedStore, ScratchStore

    resident = quantize_model(load_model(checkpoint)[0])
    config = resident.config
    minimum = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int8").minimum_bytes
    inputs = build_inputs(resident, [[6, 20, 31, 42], [6, 90]])
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        expected = resident(*args)
    scratch, blocked = tmp_path / "scratch", tmp_path / "not-a-directory"
    blocked.write_text("a file where the scratch directory would go\n")
    for directory, store in ((scratch, ScratchStore), (blocked, MappedStore)):
        monkeypatch.setenv("CPMCTL_SCRATCH_DIR", str(directory))
        if store is MappedStore:
            with pytest.warns(UserWarning, match="quantized again at every use .* set CPMCTL_SCRATCH_DIR"):
                offloaded = load_offloaded(checkpoint, budget=minimum + minimum // 4, quantize="int8")
        else:
            offloaded = load_offloaded(checkpoint, budget=minimum + minimum // 4, quantize="int8")
        try:
            assert offloaded.plan.streamed and type(offloaded.streamer.store) is store
            with torch.no_grad():
                assert torch.equal(offloaded.model(*args), expected)
        finally:
            offloaded.close()
    assert scratch.is_dir() and not list(scratch.iterdir())  # unlinked when created
    assert blocked.read_text() == "a file where the scratch directory would go\n"  # untouched

    # Too little free space: refused before any block is quantized, and the per-use path takes over.
    import shutil
    from types import SimpleNamespace

    monkeypatch.setenv("CPMCTL_SCRATCH_DIR", str(scratch))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=4096))
    with pytest.warns(UserWarning, match=r"GiB needed, 0.00 GiB free"):
        offloaded = load_offloaded(checkpoint, budget=minimum + minimum // 4, quantize="int8")
    try:
        assert type(offloaded.streamer.store) is MappedStore
        with torch.no_grad():
            assert torch.equal(offloaded.model(*args), expected)
    finally:
        offloaded.close()


def test_cli_says_in_one_line_when_streamed_int8_has_no_scratch(checkpoint, tmp_path, monkeypatch, capsys):
    """`generate --memory-limit --quantize int8` with no writable scratch directory: one `warning:` line on stderr
    (not Python's two-line warning), the same ids as with a scratch file, stdout only the JSON result."""
    from cpmctl.generate.plan import GB

    config = load_model(checkpoint)[0].config
    minimum = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int8").minimum_bytes
    base = ["generate", "今天天气", "--model", checkpoint, "--device", "cpu", "--decode", "greedy", "--quantize",
            "int8", "--memory-limit", f"{(minimum + minimum // 4) / GB:.9f}", "--max-new-tokens", "6", "--json"]
    code, with_scratch, err = run_cli(capsys, *base)
    assert code == 0 and "streamed" in err and "warning" not in err, err
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    monkeypatch.setenv("CPMCTL_SCRATCH_DIR", str(blocked))
    code, without, err = run_cli(capsys, *base)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "quantized again at every use" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: --quantize int8: streamed blocks"), err
    assert "UserWarning" not in err
    assert json.loads(without)["token_ids"] == json.loads(with_scratch)["token_ids"]


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
    code, _, err = run_cli(capsys, *base + ["--quantize", "int2"])
    assert code == 2 and "--quantize must be one of int8" in err
    code, _, err = run_cli(capsys, *base[:-1] + ["--quantize", "int8", "--adapter", str(checkpoint)])
    assert code == 2 and "merge the adapter first" in err


# ----- int8-dynamic: int8 activations ---------------------------------------------------------------------------
def reference_w8a8(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """DynamicInt8Linear recomputed with plain torch ops: each row divided by its max |x| (that is what makes the
    scale per token), the rows quantized with one asymmetric 7-bit scale and zero point (fbgemm's choice with
    reduce_range, and its floor on the scale), the product of the integers in int32, then rescaled."""
    peak = x.abs().amax(dim=1, keepdim=True) if x.shape[0] > 1 else torch.ones(1, 1)
    xn = x / peak
    lo, hi = min(xn.min().item(), 0.0), max(xn.max().item(), 0.0)
    scale = (hi - lo) / 127
    zero = int(round(-lo / scale))
    scale = max(scale, 6.1e-5)  # torch's smallest activation scale (a lone token is not divided by its peak)
    xq = (torch.round(xn / scale) + zero).clamp(0, 127).to(torch.int32)
    acc = torch.mm(xq - zero, q.to(torch.int32).t())  # int32: at most 127 * 127 * in_features
    return acc.double() * scale * w_scale.double()[None] * peak.double()


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("in_features", [64, 100, 13])
def test_dynamic_linear_matches_the_integer_reference(rows, in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 24, bias=False)
    module = DynamicInt8Linear.from_int8(Int8Linear.from_linear(linear, torch.bfloat16))
    # tokens of very different sizes; a lone one small enough to meet the kernel's floor on the scale
    x = torch.randn(rows, in_features) * torch.logspace(-3, 1, rows)[:, None]
    y = module(x)
    assert y.shape == (rows, 24) and y.dtype == torch.float32
    q = Int8Linear.from_linear(linear, torch.bfloat16).weight_int8[:, :in_features]
    reference = reference_w8a8(x, q, module.scale).float()
    # Per row, a rounding tie decided the other way moves one activation by one level: far below the int8 error.
    for row in range(rows):
        step = max(x[row].abs().max() * 2 / 127, 6.1e-5) * module.scale.max() * 127
        assert (y[row] - reference[row]).abs().max() <= 2 * step, row
    if rows > 1:  # per token: the smallest row is as accurate, relative to itself, as the largest (one scale per
        # tensor would round the 1e-3 row to nothing)
        exact = F.linear(x, linear.weight)
        relative = (y - exact).norm(dim=1) / exact.norm(dim=1)
        assert relative.max() < 0.05, relative


def test_dynamic_linear_does_not_saturate():
    """Full-range activations against full-range weights of the same sign: AVX2's int16 pair sums would halve the
    result without reduce_range (measured: 0.506 of the true sum)."""
    w = torch.ones(8, 256)
    module = DynamicInt8Linear.from_weight(w)
    y = module(torch.ones(1, 256))
    assert torch.allclose(y, torch.full((1, 8), 256.0), rtol=1e-2)


def test_dynamic_modes_on_a_model():
    cfg = tiny_config(300, num_layers=3)
    model = build_model(cfg, seed=1).eval()
    inputs = build_inputs(model, [[6, 20, 31, 42, 53, 64, 75, 80, 91, 102]])
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        exact = model(*args)
        for mode in ("int8-dynamic", "int8-dynamic-head"):
            quantized = quantize_model(build_model(cfg, seed=1).eval(), mode)
            linears = [m for m in quantized.encoder.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
            assert not linears and any(isinstance(m, DynamicInt8Linear) for m in quantized.encoder.modules())
            assert hasattr(quantized, "output_head") == (mode == "int8-dynamic-head")
            assert torch.equal(quantized.input_embedding.weight, model.input_embedding.weight)  # lookups exact
            out = quantized(*args)
            assert ((out - exact).norm() / exact.norm()).item() < 0.08, mode
            assert (out.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.7, mode
            import copy

            assert torch.equal(copy.deepcopy(quantized)(*args), out)  # the bench copies models


@pytest.mark.parametrize("mode", [q for q in QUANTIZE_CHOICES if q != "int4"])  # int4: tests/test_int4.py
def test_decode_step_of_an_int8_model_equals_its_forward(mode):
    """generate/step.py calls the int8 modules on (rows, dim) activations: the same logits as the model's forward,
    for one row (fbgemm's per-tensor scale) and for several (per-token scales)."""
    from tests.test_generate import _steps_of_both, _texts

    model = quantize_model(build_model(tiny_config(341, num_layers=2), seed=4).eval(), mode)
    for lengths in ([7], [3, 10]):
        for plain, fast in _steps_of_both(model, _texts(lengths, 2)):
            assert torch.equal(fast, plain), (mode, lengths)


def test_grouped_dynamic_linears_give_the_same_numbers():
    """q, k, v (and w_0, w_1) packed as one fbgemm weight: the same logits as one packed weight per linear, for a
    prompt pass of several rows and for decode steps; an input changed in place is computed again."""
    import copy

    from cpmctl.generate.quant import DynamicInt8Group, GroupMember, replace_linears, use_int8_activations
    from tests.test_generate import _texts

    base = build_model(tiny_config(341, num_layers=2, mask_modules=[[False, True], [False, False]]), seed=6).eval()
    grouped = quantize_model(copy.deepcopy(base), "int8-dynamic-head")
    single = copy.deepcopy(base)
    for block in single.encoder.layers:
        replace_linears(block, torch.bfloat16, quantize_now=True)
    use_int8_activations(single, "int8-dynamic-head", group=False)
    assert isinstance(grouped.encoder.layers[0].self_att.self_attention.project_k, GroupMember)
    assert not any(isinstance(m, GroupMember) for m in single.modules())
    texts = _texts([4, 11, 8], 5)
    inputs = build_inputs(base, texts)
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        assert torch.equal(grouped(*args), single(*args))
    cfg = GenerationConfig(decode="greedy", max_new_tokens=10)
    for rows in (texts[:1], texts):
        assert greedy(grouped, build_inputs(base, rows), cfg) == greedy(single, build_inputs(base, rows), cfg)

    attention = grouped.encoder.layers[1].self_att.self_attention
    group: DynamicInt8Group = attention.project_q.group
    x = torch.randn(2, 64)
    with torch.no_grad():
        first = attention.project_v(x)
        x.mul_(2)  # the same tensor, changed in place: not the cached product
        assert not torch.equal(attention.project_v(x), first)
        assert torch.equal(attention.project_v(x), group.linear(x)[:, 128:])


def test_dynamic_modes_are_refused_where_they_cannot_run():
    with pytest.raises(CpmctlError, match="runs on the CPU only"):
        check_dynamic_support("int8-dynamic", "cuda")
    with pytest.raises(CpmctlError, match="needs every block resident"):
        check_dynamic_support("int8-dynamic-head", "cpu", streamed=True)
    with pytest.raises(CpmctlError, match="must be one of"):
        quantize_model(build_model(tiny_config(300), seed=1), "int2")


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-dynamic-head"])
def test_cli_generate_dynamic(checkpoint, capsys, mode):
    base = ["generate", "今天天气", "--model", str(checkpoint), "--device", "cpu", "--decode", "greedy",
            "--max-new-tokens", "8", "--json"]
    code, out, err = run_cli(capsys, *base + ["--quantize", mode])
    assert code == 0, err
    ids = json.loads(out)["token_ids"]
    # the same as quantizing the loaded model directly
    from cpmctl.generate.decode import encode_prompt
    from cpmctl.model.tokenizer import CPMAntTokenizer

    model = quantize_model(load_model(checkpoint)[0].eval(), mode)
    tokenizer = CPMAntTokenizer(checkpoint / "vocab.txt")
    inputs = build_inputs(model, [encode_prompt(tokenizer, "今天天气")])
    expected = greedy(model, inputs, GenerationConfig(decode="greedy", max_new_tokens=8))[0]
    assert ids == expected
    # a limit where blocks would stream: refused before loading (packed weights do not stream)
    config = load_model(checkpoint)[0].config
    plan = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize=mode)
    limit = plan.minimum_bytes + max(plan.block_bytes) // 2  # one block resident at most
    code, _, err = run_cli(capsys, *base + ["--quantize", mode, "--memory-limit", f"{limit / 1e9:.9f}"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs every block resident" in err


def test_cli_bad_quantize_choice_is_one_line(checkpoint, capsys):
    code, _, err = run_cli(capsys, "generate", "今天天气", "--model", str(checkpoint), "--device", "cpu",
                           "--quantize", "int8-static")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(choice in err for choice in QUANTIZE_CHOICES)
