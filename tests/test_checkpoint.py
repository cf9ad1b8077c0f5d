"""Checkpoint formats: lossless native <-> original conversion, mask_modules through the original format, the HF
layout, and one-line errors for damaged or mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cpmctl import CpmctlError
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import (
    NATIVE_WEIGHTS,
    convert,
    detect_format,
    load_model,
    read_checkpoint,
    read_config,
    save_native,
    save_original,
)
from cpmctl.model.config import CPMAntConfig
from tests.conftest import tiny_config

VOCAB = 341
MASK = [[False, False], [True, False], [False, True], [True, True]]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that equality is bit-exact (NaN payloads and -0.0 included)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_native_original_round_trip_is_bit_exact(tmp_path, tiny_vocab, dtype):
    model = build_model(tiny_config(VOCAB), seed=0)
    save_native(model, tmp_path / "a", vocab=tiny_vocab, dtype=dtype)
    pt = convert(tmp_path / "a", "original", tmp_path / "orig" / "ant.pt")
    assert pt.with_suffix(".json").exists() and (pt.parent / "vocab.txt").exists()
    convert(pt, "native", tmp_path / "b")
    convert(tmp_path / "b", "original", tmp_path / "orig2")  # a directory target gets model.pt + model.json

    first = load_file(str(tmp_path / "a" / NATIVE_WEIGHTS))
    assert {t.dtype for t in first.values()} == {dtype}
    _assert_bit_exact(first, torch.load(pt, weights_only=True))
    _assert_bit_exact(first, load_file(str(tmp_path / "b" / NATIVE_WEIGHTS)))
    _assert_bit_exact(first, torch.load(tmp_path / "orig2" / "model.pt", weights_only=True))
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads((tmp_path / "b" / "config.json").read_text())
    assert (tmp_path / "b" / "vocab.txt").read_bytes() == tiny_vocab.read_bytes()


def test_original_round_trip_keeps_mask_modules(tmp_path):
    config = tiny_config(VOCAB, num_layers=4, mask_modules=MASK)
    model = build_model(config, seed=1).eval()
    pt, cfg = save_original(model, tmp_path / "pruned", dtype=torch.float32)
    assert json.loads(cfg.read_text())["mask_modules"] == MASK
    keys = set(torch.load(pt, weights_only=True))
    assert "encoder.layers.1.self_att.self_attention.project_q.weight" not in keys
    assert "encoder.layers.2.ffn.ffn.w_out.weight" not in keys
    assert "encoder.layers.3.self_att.layernorm_before_attention.weight" not in keys
    assert "encoder.layers.1.ffn.ffn.w_out.weight" in keys

    convert(pt, "native", tmp_path / "native")
    convert(tmp_path / "native", "original", tmp_path / "again.pt")
    _assert_bit_exact(torch.load(pt, weights_only=True), torch.load(tmp_path / "again.pt", weights_only=True))
    loaded, info = load_model(tmp_path / "again.pt")
    assert info.config.mask_modules == MASK and info.format == "original"
    assert loaded.encoder.layers[3].self_att is None and loaded.encoder.layers[3].ffn is None
    ids = torch.tensor([list(range(VOCAB + 64, VOCAB + 96)) + [6, 20, 30]])
    seg = torch.tensor([[0] * 32 + [2] * 3])
    ctx = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model(ids, seg, ctx), loaded(ids, seg, ctx), atol=1e-5)


def test_hf_layout_round_trip_and_pruned_export(tmp_path, tiny_vocab):
    model = build_model(tiny_config(VOCAB), seed=2)
    save_native(model, tmp_path / "native", dtype=torch.float32)
    convert(tmp_path / "native", "hf", tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    hf_state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert hf_state["cpmant.input_embedding.weight"].shape[0] == VOCAB + 1024
    assert torch.equal(hf_state["lm_head.weight"], hf_state["cpmant.input_embedding.weight"][:VOCAB])
    convert(tmp_path / "hf", "native", tmp_path / "back")
    a = load_file(str(tmp_path / "native" / NATIVE_WEIGHTS))
    b = load_file(str(tmp_path / "back" / NATIVE_WEIGHTS))
    for key in a:  # folding and unfolding multiply and divide: equal to rounding, not bit-exact
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-6), key

    # A pruned model: dropped sub-blocks written as zeros, mask_modules kept, and read back as the pruned model.
    pruned = build_model(tiny_config(VOCAB, num_layers=4, mask_modules=MASK), seed=3)
    save_native(pruned, tmp_path / "pruned", vocab=tiny_vocab)
    convert(tmp_path / "pruned", "hf", tmp_path / "pruned-hf")
    hf_dir = tmp_path / "pruned-hf"
    assert json.loads((hf_dir / "config.json").read_text())["mask_modules"] == MASK
    assert {"tokenizer_config.json", "generation_config.json", "vocab.txt"} <= {p.name for p in hf_dir.iterdir()}
    hf_state = load_file(str(hf_dir / "model.safetensors"))
    assert not hf_state["cpmant.encoder.layers.1.self_att.self_attention.project_q.weight"].any()
    assert not hf_state["cpmant.encoder.layers.2.ffn.ffn.w_out.weight"].any()
    assert hf_state["cpmant.encoder.layers.2.self_att.self_attention.project_q.weight"].any()
    info, back = read_checkpoint(hf_dir)
    assert info.config.mask_modules == MASK
    original = load_file(str(tmp_path / "pruned" / NATIVE_WEIGHTS))
    assert sorted(back) == sorted(original)
    for key in original:
        assert torch.allclose(original[key], back[key], rtol=1e-6, atol=1e-6), key

    # A dropped sub-block whose zeros were trained away cannot be read as dropped: refused, naming the key.
    hf_state["cpmant.encoder.layers.1.self_att.self_attention.attention_out.weight"][0, 0] = 0.5
    from safetensors.torch import save_file

    save_file(hf_state, str(hf_dir / "model.safetensors"))
    with pytest.raises(CpmctlError, match="layers.1.self_att.self_attention.attention_out.weight belongs to a "
                                          "sub-block that mask_modules drops"):
        read_checkpoint(hf_dir)


def test_load_model_dtypes(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=4)
    save_native(model, tmp_path / "half", dtype=torch.float16)
    kept, info = load_model(tmp_path / "half", dtype=None)
    assert info.dtype == torch.float16 and kept.input_embedding.weight.dtype == torch.float16
    fp32, _ = load_model(tmp_path / "half")
    assert fp32.input_embedding.weight.dtype == torch.float32
    assert not fp32.training


def test_read_config_does_not_need_weights(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=5)
    pt, _ = save_original(model, tmp_path / "m")
    pt.write_bytes(b"not read")
    config, fmt = read_config(pt)
    assert fmt == "original" and config.vocab_size == VOCAB


# ----- bad input ---------------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CpmctlError, match="checkpoint not found") as e:
        read_checkpoint(tmp_path / "nope")
    _one_line(e)

    model = build_model(tiny_config(VOCAB), seed=6)
    save_native(model, tmp_path / "native")
    weights = tmp_path / "native" / NATIVE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CpmctlError, match="cannot read safetensors") as e:
        read_checkpoint(tmp_path / "native")
    _one_line(e)

    pt, _ = save_original(model, tmp_path / "orig")
    pt.write_bytes(pt.read_bytes()[:2000])
    with pytest.raises(CpmctlError, match="cannot read checkpoint") as e:
        read_checkpoint(pt)
    _one_line(e)

    torch.save({"weight": [1, 2, 3]}, tmp_path / "junk.pt")
    (tmp_path / "junk.json").write_text(json.dumps(tiny_config(VOCAB).to_dict()))
    with pytest.raises(CpmctlError, match="not a state dict of tensors"):
        read_checkpoint(tmp_path / "junk.pt")

    (tmp_path / "lonely").mkdir()
    torch.save(model.state_dict(), tmp_path / "lonely" / "w.pt")
    with pytest.raises(CpmctlError, match="no config beside it"):
        read_checkpoint(tmp_path / "lonely" / "w.pt")

    (tmp_path / "native" / "config.json").write_text("{ not json")
    with pytest.raises(CpmctlError, match="not valid JSON") as e:
        read_checkpoint(tmp_path / "native")
    _one_line(e)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CpmctlError, match="no config.json"):
        read_checkpoint(tmp_path / "empty")


def test_config_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=7)
    pt, cfg = save_original(model, tmp_path / "m")
    state = torch.load(pt, weights_only=True)
    del state["encoder.layers.1.ffn.ffn.w_out.weight"]
    state["encoder.layers.9.extra.weight"] = torch.zeros(2)
    state["encoder.layers.0.self_att.self_attention.project_q.weight"] = torch.zeros(3, 64)
    torch.save(state, pt)
    with pytest.raises(CpmctlError) as e:
        read_checkpoint(pt)
    text = _one_line(e)
    assert "missing 1 keys (encoder.layers.1.ffn.ffn.w_out.weight)" in text
    assert "unexpected 1 keys (encoder.layers.9.extra.weight)" in text
    assert "mis-shaped 1 keys (encoder.layers.0.self_att.self_attention.project_q.weight (3, 64) != (64, 64))" in text

    # A config that says 3 layers for a 2-layer checkpoint: the missing keys are counted and previewed.
    torch.save(model.state_dict(), pt)
    cfg.write_text(json.dumps(tiny_config(VOCAB, num_layers=3).to_dict()))
    with pytest.raises(CpmctlError, match=r"missing 9 keys \(encoder\.layers\.2\..*, \.\.\. 6 more\)"):
        read_checkpoint(pt)


def test_failed_conversion_keeps_existing_output(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=8)
    save_native(model, tmp_path / "good")
    save_native(build_model(tiny_config(VOCAB), seed=9), tmp_path / "out")
    before = (tmp_path / "out" / NATIVE_WEIGHTS).read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(tiny_config(VOCAB).to_dict()))
    (tmp_path / "bad" / NATIVE_WEIGHTS).write_bytes(b"\x00" * 100)
    with pytest.raises(CpmctlError):
        convert(tmp_path / "bad", "native", tmp_path / "out")
    assert (tmp_path / "out" / NATIVE_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]  # no temp leftovers


def test_config_errors():
    with pytest.raises(CpmctlError, match="mask_modules has 3 pairs but num_layers is 2"):
        tiny_config(VOCAB, mask_modules=[[False, False]] * 3)
    with pytest.raises(CpmctlError, match="'dim_model' must be an integer"):
        CPMAntConfig.from_dict({"dim_model": "big"}, "x.json")
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        assert CPMAntConfig.from_dict({"dim_model": 8, "fancy": 1}, "x.json").dim_model == 8
