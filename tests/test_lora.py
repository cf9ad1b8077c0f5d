"""LoRA through peft on the folded CPM-Ant: injection and counts, adapter save/load in peft's format, exact merge,
import of an original OpenDelta delta, and the errors for adapters that do not fit."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cpmctl import CpmctlError
from cpmctl.cli.app import main
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_native, save_original
from cpmctl.model.config import CPMAntConfig
from cpmctl.model import lora as L
from cpmctl.tune.import_delta import convert_delta, import_delta
from tests.conftest import random_inputs, tiny_config

VOCAB = 120


def _inputs(seed=0, b=2, n=20):
    return random_inputs(VOCAB, seed, b, n)

def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def _randomise_lora(model, seed=1):
    """B starts at zero (a fresh adapter is a no-op); give every LoRA tensor values so deltas are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if L.is_lora_parameter(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def base_dir(tmp_path, tiny_vocab):
    model = build_model(tiny_config(VOCAB), seed=0)
    return save_native(model, tmp_path / "base")


def test_inject_counts_and_freezes():
    cfg = tiny_config(VOCAB)
    model = L.inject_lora(build_model(cfg, seed=0), L.LoraSettings())
    counts = L.parameter_counts(model)
    # r 8 on project_q and project_v of each layer: 2 * (8 * in + out * 8) per layer.
    inner = cfg.num_heads * cfg.dim_head
    assert counts["trainable"] == cfg.num_layers * 2 * (8 * cfg.dim_model + inner * 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(L.is_lora_parameter(n) for n in trainable)
    assert type(model).__name__ == "CPMAnt"  # injected in place: every consumer still sees a CPMAnt


def test_dry_run_counts_for_the_real_10b():
    counts = L.dry_run_counts(CPMAntConfig(), L.LoraSettings())
    assert counts["trainable"] == 6_291_456  # 2 * (8 * 4096 + 4096 * 8) * 48, the original's number
    assert counts["lora_modules"] == 96
    assert counts["total"] - counts["trainable"] == sum(
        p.numel() for p in build_model(CPMAntConfig(), device="meta").parameters()
    )


def test_dry_run_counts_skip_dropped_sub_blocks():
    cfg = tiny_config(VOCAB, num_layers=3, mask_modules=[[False, False], [True, False], [False, True]])
    counts = L.dry_run_counts(cfg, L.LoraSettings(targets=["project_q", "w_out"]))
    assert counts["lora_modules"] == 2 + 2  # project_q in layers 0 and 2, w_out in layers 0 and 1


@pytest.mark.parametrize("settings", [L.LoraSettings(), L.LoraSettings(rslora=True, r=4, alpha=8),
                                      L.LoraSettings(dora=True, targets=["project_q", "project_v", "w_out"])])
def test_adapter_roundtrip_merge_and_peft_compatibility(tmp_path, base_dir, capsys, settings):
    model, _ = load_model(base_dir)
    L.inject_lora(model, settings)
    _randomise_lora(model)
    x = _inputs()
    with torch.no_grad():
        ref = model(*x)
        plain = load_model(base_dir)[0](*x)
    assert (ref - plain).abs().max() > 1e-3  # the adapter really changes the outputs
    L.save_adapter(model, tmp_path / "adapter", settings)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {L.ADAPTER_CONFIG, L.ADAPTER_WEIGHTS, L.ADAPTER_META}

    loaded, _ = L.load_model_with_adapter(base_dir, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(*x), ref)

    # The keys are those peft gives the LoRA on transformers' CpmAntForCausalLM (plain PeftModel.from_pretrained on
    # the HF export applies it: tests/test_hf_interop.py).
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "adapter" / L.ADAPTER_WEIGHTS)))
    assert keys and all(k.startswith("base_model.model.cpmant.encoder.layers.") for k in keys)

    code, _, err = _run(["tune", "merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged, _ = load_model(tmp_path / "merged")
    assert not L.lora_modules(merged)
    with torch.no_grad():
        assert (merged(*x) - ref).abs().max() < 1e-5


def test_adapter_for_another_shape_is_refused(tmp_path, base_dir, capsys):
    other = build_model(tiny_config(VOCAB, dim_model=32, num_heads=2), seed=0)
    L.inject_lora(other, L.LoraSettings())
    L.save_adapter(other, tmp_path / "adapter", L.LoraSettings())
    with pytest.raises(CpmctlError, match="another model shape.*dim_model 32 != 64"):
        L.load_model_with_adapter(base_dir, tmp_path / "adapter")
    code, _, err = _run(["tune", "merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "merged")], capsys)
    assert code == 2 and "another model shape" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()

    # Without the cpmctl meta file the tensor shapes still catch it.
    (tmp_path / "adapter" / L.ADAPTER_META).unlink()
    with pytest.raises(CpmctlError, match="does not fit.*mis-shaped"):
        L.load_model_with_adapter(base_dir, tmp_path / "adapter")


def _adapted(base_dir, settings=None):
    model, _ = load_model(base_dir)
    L.inject_lora(model, settings or L.LoraSettings())
    _randomise_lora(model)
    return model


def test_adapter_of_an_older_cpmctl_still_loads(tmp_path, base_dir):
    """Version 1 adapters named the keys without HF's `cpmant.` prefix; they load with the same effect."""
    model = _adapted(base_dir)
    L.save_adapter(model, tmp_path / "new", L.LoraSettings())
    from safetensors.torch import load_file, save_file

    new = load_file(str(tmp_path / "new" / L.ADAPTER_WEIGHTS))
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    save_file({k.replace("base_model.model.cpmant.", "base_model.model."): v for k, v in new.items()},
              str(tmp_path / "old" / L.ADAPTER_WEIGHTS))
    meta = json.loads((tmp_path / "old" / L.ADAPTER_META).read_text())
    (tmp_path / "old" / L.ADAPTER_META).write_text(json.dumps({**meta, "version": 1}))
    x = _inputs()
    with torch.no_grad():
        want = model(*x)
        assert torch.equal(L.load_model_with_adapter(base_dir, tmp_path / "old")[0](*x), want)
        assert torch.equal(L.load_model_with_adapter(base_dir, tmp_path / "new")[0](*x), want)


def test_adapter_records_its_base_and_refuses_other_weights(tmp_path, base_dir, capsys, monkeypatch):
    L.save_adapter(_adapted(base_dir), tmp_path / "adapter", L.LoraSettings(), base_model=str(base_dir))
    base = json.loads((tmp_path / "adapter" / L.ADAPTER_META).read_text())["base_model"]
    weights = base_dir / "model.safetensors"
    import hashlib

    assert base["path"] == str(base_dir.resolve()) and base["format"] == "native"
    assert base["files"] == [{"name": "model.safetensors", "bytes": weights.stat().st_size,
                              "mtime_ns": weights.stat().st_mtime_ns,
                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}]
    config = json.loads((tmp_path / "adapter" / L.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve()) and config["task_type"] == "CAUSAL_LM"

    # A copy elsewhere (same bytes) is the same base; other weights of the same shape are not.
    shutil.copytree(base_dir, tmp_path / "copy")
    L.load_model_with_adapter(tmp_path / "copy", tmp_path / "adapter")
    other = save_native(build_model(tiny_config(VOCAB), seed=5), tmp_path / "other")
    with pytest.raises(CpmctlError, match=r"was trained on .*base \(sha256 [0-9a-f]{12}\), but .*other holds other "
                                          r"weights .*CPMCTL_ADAPTER_BASE_CHECK=warn"):
        L.load_model_with_adapter(other, tmp_path / "adapter")
    code, _, err = _run(["generate", "hi", "--model", str(other), "--adapter", str(tmp_path / "adapter"),
                         "--max-new-tokens", "2", "--device", "cpu"], capsys)
    assert code == 2 and "holds other weights" in err and "Traceback" not in err

    # The base rewritten in place (same path, new content) is caught too: its size or mtime moved, so it is hashed.
    shutil.copyfile(other / "model.safetensors", weights)
    with pytest.raises(CpmctlError, match="holds other weights"):
        L.load_model_with_adapter(base_dir, tmp_path / "adapter")

    # Forced: loads, with a warning on stderr.
    monkeypatch.setenv(L.BASE_CHECK_ENV, "warn")
    capsys.readouterr()
    L.load_model_with_adapter(other, tmp_path / "adapter")
    assert "warning:" in capsys.readouterr().err
    monkeypatch.setenv(L.BASE_CHECK_ENV, "maybe")
    with pytest.raises(CpmctlError, match="CPMCTL_ADAPTER_BASE_CHECK must be error or warn"):
        L.load_model_with_adapter(other, tmp_path / "adapter")


def test_bad_adapter_directories(tmp_path, base_dir):
    with pytest.raises(CpmctlError, match="adapter not found"):
        L.read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CpmctlError, match="no adapter_config.json"):
        L.read_adapter(tmp_path / "empty")
    model = L.inject_lora(build_model(tiny_config(VOCAB), seed=0), L.LoraSettings())
    L.save_adapter(model, tmp_path / "a", L.LoraSettings())
    # A config naming targets the weights do not hold is refused (peft would only warn and leave them at zero).
    cfg_file = tmp_path / "a" / L.ADAPTER_CONFIG
    good = cfg_file.read_text()
    cfg_file.write_text(json.dumps({**json.loads(good), "target_modules": ["project_q", "project_v", "w_out"]}))
    with pytest.raises(CpmctlError, match="target_modules project_q, project_v, w_out but the weights adapt "
                                          "project_q, project_v"):
        L.read_adapter(tmp_path / "a")
    cfg_file.write_text(json.dumps({**json.loads(good), "fan_in_fan_out": True}))
    with pytest.raises(CpmctlError, match="fan_in_fan_out = True is a peft feature cpmctl's LoRA does not apply"):
        L.read_adapter(tmp_path / "a")
    cfg_file.write_text(good)
    (tmp_path / "a" / L.ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CpmctlError, match="cannot read safetensors"):
        L.read_adapter(tmp_path / "a")
    with pytest.raises(CpmctlError, match="lora.targets: unknown module 'q_proj'"):
        L.LoraSettings(targets=["q_proj"]).validate()


# ----- import of an original OpenDelta delta -------------------------------------------------------------------
def _opendelta_delta(config: CPMAntConfig, r=8, seed=3) -> dict[str, torch.Tensor]:
    """A delta as OpenDelta's LoraModel saves it on CPM-Ant (fp16, like the original training)."""
    g = torch.Generator().manual_seed(seed)
    inner = config.num_heads * config.dim_head
    state = {}
    for i in range(config.num_layers):
        for name in ("project_q", "project_v"):
            key = f"encoder.layers.{i}.self_att.self_attention.{name}.lora"
            state[f"{key}.lora_A"] = (torch.randn(r, config.dim_model, generator=g) * 0.3).half()
            state[f"{key}.lora_B"] = (torch.randn(inner, r, generator=g) * 0.3).half()
    return state


def _opendelta_hooks(model, delta: dict, scaling: float):
    """OpenDelta's parallel insertion, reproduced: the target module's output plus scaling * x A^T B^T."""
    handles = []
    for i, block in enumerate(model.encoder.layers):
        for name in ("project_q", "project_v"):
            key = f"encoder.layers.{i}.self_att.self_attention.{name}.lora"
            a, b = delta[f"{key}.lora_A"].float(), delta[f"{key}.lora_B"].float()
            module = getattr(block.self_att.self_attention, name)
            handles.append(module.register_forward_hook(
                lambda m, inp, out, a=a, b=b: out + (inp[0] @ a.T @ b.T) * scaling))
    return handles


def test_import_delta_matches_the_original_computation(tmp_path, capsys):
    cfg = tiny_config(VOCAB)
    model = build_model(cfg, seed=0)
    pt, _ = save_original(model, tmp_path / "orig" / "model")  # original-convention weights on disk
    delta = _opendelta_delta(cfg)
    torch.save(delta, tmp_path / "delta.pt")

    # One module in the original convention: CPM-Live Linear divides by sqrt(in) inside its forward, and OpenDelta
    # adds its parallel LoRA output after that.
    original_w = torch.load(pt, weights_only=True)["encoder.layers.1.self_att.self_attention.project_v.weight"]
    a = delta["encoder.layers.1.self_att.self_attention.project_v.lora.lora_A"].float()
    b = delta["encoder.layers.1.self_att.self_attention.project_v.lora.lora_B"].float()
    x = torch.randn(3, cfg.dim_model)
    expected = (x @ original_w.T) / math.sqrt(cfg.dim_model) + 2.0 * (x @ a.T @ b.T)

    code, stdout, err = _run(["tune", "import-delta", str(tmp_path / "delta.pt"), "--model", str(pt),
                              "--out", str(tmp_path / "adapter"), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["modules"] == 2 * cfg.num_layers and summary["r"] == 8 and summary["scaling"] == 2.0

    adapted, _ = L.load_model_with_adapter(pt, tmp_path / "adapter")
    module = adapted.encoder.layers[1].self_att.self_attention.project_v
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-5)

    # The whole model: peft adapter == the original model with OpenDelta's parallel modules.
    reference, _ = load_model(pt)
    _opendelta_hooks(reference, delta, scaling=2.0)
    inputs = _inputs()
    with torch.no_grad():
        want, got = reference(*inputs), adapted(*inputs)
        plain = load_model(pt)[0](*inputs)
    assert (want - plain).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-5


def test_import_delta_defaults_and_old_opendelta_keys(tmp_path):
    cfg = tiny_config(VOCAB)
    delta = _opendelta_delta(cfg, r=4)
    # The first OpenDelta releases saved an unused `lin` layer beside lora_A/lora_B; a BMTrain prefix may appear.
    delta = {f"module.{k}": v for k, v in delta.items()}
    delta["module.encoder.layers.0.self_att.self_attention.project_q.lora.lin.weight"] = torch.zeros(4, 4)
    state, settings, ignored = convert_delta(delta)
    assert settings.r == 4 and settings.targets == ["project_q", "project_v"] and ignored == 0
    assert all(k.startswith("base_model.model.cpmant.encoder.layers.") for k in state)
    torch.save(delta, tmp_path / "d.pt")
    summary = import_delta(tmp_path / "d.pt", tmp_path / "a")  # no base model: shapes checked at load time
    assert summary["scaling"] == 4.0  # OpenDelta's alpha 16 over r 4
    assert L.read_adapter(tmp_path / "a").base_config is None


def test_import_delta_bad_input(tmp_path, capsys):
    cfg = tiny_config(VOCAB)
    torch.save({"encoder.layers.0.ffn.ffn.w_out.weight": torch.zeros(2, 2)}, tmp_path / "full.pt")
    code, _, err = _run(["tune", "import-delta", str(tmp_path / "full.pt")], capsys)
    assert code == 2 and "no OpenDelta LoRA keys" in err

    delta = _opendelta_delta(cfg)
    del delta["encoder.layers.1.self_att.self_attention.project_q.lora.lora_B"]
    torch.save(delta, tmp_path / "half.pt")
    code, _, err = _run(["tune", "import-delta", str(tmp_path / "half.pt")], capsys)
    assert code == 2 and "encoder.layers.1.self_att.self_attention.project_q.lora.lora_B is missing" in err

    (tmp_path / "junk.pt").write_bytes(b"junk")
    code, _, err = _run(["tune", "import-delta", str(tmp_path / "junk.pt")], capsys)
    assert code == 2 and "cannot read delta checkpoint" in err

    # A delta for a wider model than the named base is refused before anything is written.
    torch.save(_opendelta_delta(tiny_config(VOCAB, dim_model=32, num_heads=2)), tmp_path / "other.pt")
    base = save_native(build_model(cfg, seed=0), tmp_path / "base")
    code, _, err = _run(["tune", "import-delta", str(tmp_path / "other.pt"), "--model", str(base),
                         "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "the base model needs" in err and not (tmp_path / "x").exists()
