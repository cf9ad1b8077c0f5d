"""Pruning building blocks on a tiny model: targets and reachability, hard-concrete gates, the Lagrangian, and
output-preserving extraction."""

from __future__ import annotations

import math

import pytest
import torch

from cpmctl import CpmctlError
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, save_original
from cpmctl.model.config import resolve_config
from cpmctl.prune.extract import extract
from cpmctl.prune.gates import BETA, HardConcrete, Lagrangian, Selection, StageMasks, clear_gates, top_k_mask
from cpmctl.prune.targets import Shape, check_checkpoint_shape, plan_stages, plan_summary
from tests.conftest import random_inputs, tiny_config

VOCAB = 120


def _inputs(seed=0, b=2, n=24):
    return random_inputs(VOCAB, seed, b, n, two_spans=True)

def _config(**kw):
    base = dict(num_layers=4, num_heads=4, dim_ff=48, mask_modules=[[False, False], [False, True], [True, False],
                                                                     [False, False]])
    base.update(kw)
    return tiny_config(VOCAB, **base)


# ----- targets -------------------------------------------------------------------------------------------------
def test_full_ladder_has_every_stage_with_published_counts():
    stages = plan_stages("10b", "300m")
    assert [(s.source_name, s.target_name) for s in stages] == [
        ("10b", "7b"), ("7b", "3b"), ("3b", "2b"), ("2b", "1b"), ("1b", "300m")]
    assert [s.kinds for s in stages] == [["attention", "ffn"], ["heads", "channels"], ["attention", "ffn"],
                                         ["heads", "channels"], ["heads", "channels"]]
    rows = plan_summary(stages)
    # Non-embedding parameters as published (shared/reference/cpm-ant.md section 2).
    assert [round(r["params_non_embedding"] / 1e9, 3) for r in rows] == [6.510, 3.021, 2.013, 1.020, 0.300]
    assert rows[0]["target"]["attention_layers_kept"] == 37 and rows[0]["target"]["ffn_layers_kept"] == 32
    assert rows[-1]["target"]["num_heads"] == 4 and rows[-1]["target"]["dim_ff"] == 350


@pytest.mark.parametrize("src,dst,message", [
    ("7b", "10b", "not reachable"),
    ("mini-3b", "mini-7b", "not reachable"),
    ("7b", "7b", "not reachable"),
    ("10b", "mini-7b", "changes dim_model 4096 -> 256"),
])
def test_unreachable_targets_are_one_line_errors(src, dst, message):
    with pytest.raises(CpmctlError, match=message) as e:
        plan_stages(src, dst)
    assert "\n" not in str(e.value)


def test_config_file_target_that_grows_is_rejected(tmp_path):
    cfg = resolve_config("mini-3b")
    cfg.num_heads = 6
    cfg.dim_ff = 700
    cfg.save(tmp_path / "wide.json")
    with pytest.raises(CpmctlError, match="cannot grow dim_ff 640 -> 700"):
        plan_stages("mini-7b", str(tmp_path / "wide.json"))


def test_checkpoint_must_have_the_from_shape():
    stages = plan_stages("mini-7b", "mini-3b")
    check_checkpoint_shape(resolve_config("mini-7b"), stages, "ok")
    with pytest.raises(CpmctlError, match="--model m has shape .* but --from mini-7b"):
        check_checkpoint_shape(resolve_config("mini-10b"), stages, "m")


# ----- gates ---------------------------------------------------------------------------------------------------
def test_hard_concrete_probability_matches_sampling():
    gate = HardConcrete((4000,), init_mean=0.5, init_std=0.0)
    gate.resample(torch.Generator().manual_seed(0))
    z = gate.sample()
    assert z.min() >= 0 and z.max() <= 1
    empirical = float((z > 0).float().mean())
    assert abs(empirical - float(gate.prob_nonzero()[0].detach())) < 0.02
    # The original's constant: P(z != 0) = sigmoid(log_alpha + 1.5986).
    assert math.isclose(-BETA * math.log(0.1 / 1.1), 1.5986, abs_tol=1e-4)


def test_lm_loss_gradient_reaches_every_gate():
    cfg = _config()
    model = build_model(cfg, seed=0)
    masks = StageMasks(cfg, ["attention", "ffn", "heads", "channels"], init_mean=1.0)
    # A gate clamped at exactly 0 or 1 has zero derivative (that is the hard-concrete's point); u = 0.4 puts every
    # gate of log_alpha 1 strictly inside (0, 1), so each one must see the loss.
    for gate in masks.gates.values():
        gate.noise = torch.full_like(gate.noise, 0.4)
    masks.apply(model)
    ids, segment, context, span = _inputs()
    logits = model(ids, segment, context, span)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].clamp(max=VOCAB - 1).reshape(-1))
    loss.backward()
    for kind, gate in masks.gates.items():
        grad = gate.log_alpha.grad
        assert grad is not None and torch.isfinite(grad).all(), kind
        assert grad.abs().sum() > 0, f"{kind} gates got no LM-loss gradient"


def test_lagrangian_ascent_pulls_expected_size_onto_target():
    cfg = _config()
    masks = StageMasks(cfg, ["heads", "channels"], init_mean=3.0)
    lag = Lagrangian(["heads", "channels"], {"heads": 0.5, "channels": 0.25}, warmup_steps=20)
    # As the runner sets them up: no momentum, multipliers by gradient ascent.
    opt = torch.optim.AdamW([
        {"params": masks.parameters(), "lr": 0.1, "weight_decay": 0.0, "betas": (0.0, 0.999)},
        {"params": lag.parameters(), "lr": 0.1, "weight_decay": 0.0, "maximize": True, "betas": (0.0, 0.999)},
    ])
    assert lag.target("heads", 0) == 1.0 and lag.target("heads", 10) == 0.75 and lag.target("heads", 40) == 0.5
    for step in range(400):
        penalty, _ = lag(masks.expected_fractions(), step)
        opt.zero_grad()
        penalty.backward()
        opt.step()
    expected = {k: v.detach() for k, v in masks.expected_fractions().items()}
    assert abs(float(expected["heads"]) - 0.5) < 0.06
    assert (expected["channels"] - 0.25).abs().max() < 0.06  # every layer, not just on average


def test_top_k_is_exact_and_stable():
    scores = torch.tensor([[0.3, 0.9, 0.9, -1.0], [5.0, 4.0, 3.0, 2.0]])
    keep = top_k_mask(scores, 2)
    assert keep.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert top_k_mask(scores, 0).sum() == 0


# ----- extraction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds,targets", [
    (["attention", "ffn"], {"attention": 2, "ffn": 1}),
    (["heads", "channels"], {"heads": 3, "channels": 20}),
    (["attention", "ffn", "heads", "channels"], {"attention": 1, "ffn": 2, "heads": 1, "channels": 7}),
])
def test_extracted_model_equals_masked_model(kinds, targets):
    cfg = _config()
    model = build_model(cfg, seed=3)
    # Spread log_alpha so the kept gate values are not all 1: they must be folded into the weights exactly.
    masks = StageMasks(cfg, kinds, init_mean=1.0, init_std=1.5)
    selection = masks.select(targets)
    inputs = _inputs(seed=5)
    with torch.no_grad():
        selection.apply(model)
        masked = model(*inputs)
        clear_gates(model)
        pruned = extract(model, selection)
        out = pruned(*inputs)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    shape = Shape.of(pruned.config)
    assert shape.attention_kept == targets.get("attention", cfg.num_attention_kept)
    assert shape.ffn_kept == targets.get("ffn", cfg.num_ffn_kept)
    assert shape.num_heads == targets.get("heads", cfg.num_heads)
    assert shape.dim_ff == targets.get("channels", cfg.dim_ff)
    # Layers already dropped in the source stay dropped.
    assert pruned.config.mask_modules[1][1] and pruned.config.mask_modules[2][0]


def test_extraction_is_not_the_original_defect():
    """Pruning half the channels must not rescale FFN outputs (the original grew them by sqrt(old/new))."""
    cfg = _config(mask_modules=[])
    model = build_model(cfg, seed=0)
    sel = Selection.keep_all(cfg)
    sel.channel_keep[:, cfg.dim_ff // 2 :] = False
    pruned = extract(model, sel)
    x = torch.randn(3, cfg.dim_model)
    ffn, pffn = model.encoder.layers[0].ffn.ffn, pruned.encoder.layers[0].ffn.ffn
    ffn.channel_gate = sel.channel_keep[0].float()
    torch.testing.assert_close(pffn(x), ffn(x), atol=1e-6, rtol=1e-5)


def test_pruned_checkpoint_loads_in_original_format(tmp_path):
    cfg = _config()
    model = build_model(cfg, seed=1)
    sel = StageMasks(cfg, ["attention", "ffn"]).select({"attention": 1, "ffn": 1})
    pruned = extract(model, sel)
    pt, _ = save_original(pruned, tmp_path / "pruned", dtype=torch.float32)
    loaded, info = load_model(pt)
    assert info.format == "original"
    assert loaded.config.mask_modules == sel.mask_modules
    assert sum(not a for a, _ in loaded.config.mask_modules) == 1
    state = torch.load(pt, weights_only=True)
    dropped = [i for i, (a, _) in enumerate(sel.mask_modules) if a]
    assert not any(k.startswith(f"encoder.layers.{dropped[0]}.self_att") for k in state)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), pruned(*inputs), atol=1e-5, rtol=1e-5)
