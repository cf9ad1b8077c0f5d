"""oneDNN-packed linears for CPU generation (cpmctl/generate/packed.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpmctl import CpmctlError
from cpmctl.generate.decode import beam_search, encode_prompt, greedy
from cpmctl.generate.packed import ENV, PackedLinear, pack_linears, packing_applies
from cpmctl.model.ant import build_model
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs
from tests.conftest import tiny_config
from tests.test_generate import VOCAB, _model, _steps_of_both, _texts

pytestmark = pytest.mark.skipif(not packing_applies("cpu", torch.float32), reason="this torch has no oneDNN linear")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_is_the_linear(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen).to(dtype)
    packed = PackedLinear(weight)
    assert packed.packed_weight_bytes == weight.numel() * weight.element_size() and not list(packed.parameters())
    for shape in [(1, 24), (7, 24), (2, 5, 24)]:
        x = torch.randn(*shape, generator=gen).to(dtype)
        out = packed(x)
        assert out.shape == (*shape[:-1], 40) and out.dtype == dtype
        reference = F.linear(x.double(), weight.double())
        assert (out.double() - reference).abs().max() <= tol * reference.abs().max()
    # A row's result does not depend on the rows beside it (batched decoding equals one prompt at a time).
    x = torch.randn(8, 24, generator=gen).to(dtype)
    assert torch.equal(packed(x)[3:4], packed(x[3:4]))


def test_pack_linears_replaces_the_block_linears_and_the_head():
    model = build_model(tiny_config(VOCAB, num_layers=3, mask_modules=[[False, False], [True, False], [False, True]]),
                        seed=3).eval()
    reference = copy.deepcopy(model)
    linears = sum(type(m) is nn.Linear for m in model.encoder.modules())
    assert pack_linears(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.encoder.modules())
    assert isinstance(model.output_head, PackedLinear)
    inputs = build_inputs(model, _texts([6, 11], 2))
    args = (inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    with torch.no_grad():
        got, want = model(*args), reference(*args)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the embedding lookup still reads the dense matrix (the packed head is a copy)
    assert torch.equal(model.input_embedding.weight, reference.input_embedding.weight)


@pytest.mark.parametrize("lengths", [[9], [4, 12, 7]])
def test_decode_step_equals_the_forward_bit_for_bit_when_packed(lengths):
    """The fast decode step calls the same packed modules as the forward: logits equal bit for bit."""
    model = build_model(tiny_config(VOCAB, num_layers=3, mask_modules=[[False, False], [True, False], [False, True]]),
                        seed=5).eval()
    pack_linears(model)
    for plain, fast in _steps_of_both(model, _texts(lengths, 8)):
        assert torch.equal(fast, plain)


def test_packed_decoding_gives_the_same_ids():
    model = _model(16)
    packed = copy.deepcopy(model)
    pack_linears(packed)
    for lengths in ([5], [5, 9, 3]):
        texts = _texts(lengths, 3)
        for cfg, decode in ((GenerationConfig(decode="greedy", max_new_tokens=10), greedy),
                            (GenerationConfig(decode="beam", beam_size=3, max_new_tokens=6), beam_search)):
            assert decode(packed, build_inputs(packed, texts), cfg) == decode(model, build_inputs(model, texts), cfg)
    # batched rows are decoded as they are one prompt at a time
    texts = _texts([7, 7, 7], 4)
    cfg = GenerationConfig(decode="greedy", max_new_tokens=8)
    together = greedy(packed, build_inputs(packed, texts), cfg)
    assert together == [greedy(packed, build_inputs(packed, [t]), cfg)[0] for t in texts]


def test_generation_loads_packed_on_the_cpu_unless_told_otherwise(monkeypatch, tmp_path, tiny_vocab):
    from cpmctl.generate.batch import prepare_generation
    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.tokenizer import CPMAntTokenizer

    ckpt = save_native(build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=16), tmp_path / "ckpt",
                       vocab=tiny_vocab)
    cfg = GenerationConfig(decode="greedy", max_new_tokens=5)
    monkeypatch.delenv(ENV, raising=False)
    run = prepare_generation(ckpt, cfg, prompt="今天天气", device="cpu")
    assert isinstance(run.loaded.model.output_head, PackedLinear)
    packed_ids = [r.token_ids for r in run.results()]
    monkeypatch.setenv(ENV, "blas")
    run = prepare_generation(ckpt, cfg, prompt="今天天气", device="cpu")
    assert not hasattr(run.loaded.model, "output_head")
    assert [r.token_ids for r in run.results()] == packed_ids
    monkeypatch.setenv(ENV, "mkl")
    with pytest.raises(CpmctlError, match=f"{ENV} must be 'onednn' or 'blas', got 'mkl'"):
        prepare_generation(ckpt, cfg, prompt="今天天气", device="cpu")


def test_packing_applies_only_to_cpu_float_models(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert packing_applies("cpu", torch.bfloat16)
    assert not packing_applies("cpu", torch.float16)
    assert not packing_applies("meta", torch.float32)


def test_the_planner_counts_the_head_copies(monkeypatch):
    from cpmctl.generate.plan import plan_memory

    monkeypatch.delenv(ENV, raising=False)
    config = tiny_config(VOCAB)
    free = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None)
    head = config.vocab_size * config.dim_model * 4
    assert (free.output_head, free.head_bytes) == ("onednn", head)
    assert free.weight_bytes == free.fixed_bytes + head + sum(free.block_bytes)
    # never part of the minimum: a limited plan streams rather than packs the head
    limited = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=free.minimum_bytes)
    assert limited.output_head is None and limited.head_bytes == 0 and limited.minimum_bytes == free.minimum_bytes
    int8 = plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None, quantize="int8-dynamic-head")
    assert (int8.output_head, int8.head_bytes) == ("int8", config.vocab_size * (config.dim_model + 4))
    monkeypatch.setenv(ENV, "blas")
    assert plan_memory(config, device_type="cpu", dtype=torch.float32, budget=None).output_head is None


def test_quantized_generation_packs_the_fp32_head(tmp_path, tiny_vocab, monkeypatch):
    from cpmctl.generate.batch import prepare_generation
    from cpmctl.generate.quant import quantize_model
    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.tokenizer import CPMAntTokenizer

    monkeypatch.delenv(ENV, raising=False)
    model = build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=16).eval()
    ckpt = save_native(model, tmp_path / "ckpt", vocab=tiny_vocab)
    cfg = GenerationConfig(decode="greedy", max_new_tokens=6)
    run = prepare_generation(ckpt, cfg, prompt="今天天气", device="cpu", quantize="int8")
    assert run.plan.output_head == "onednn" and isinstance(run.loaded.model.output_head, PackedLinear)
    [result] = run.results()
    reference = quantize_model(copy.deepcopy(model), "int8")
    inputs = build_inputs(reference, [encode_prompt(run.loaded.tokenizer, "今天天气")])
    assert result.token_ids == greedy(reference, inputs, cfg)[0]
