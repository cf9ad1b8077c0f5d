"""Selection methods of `cpmctl prune`: activation importance (Minitron) and drop-one importance recomputed by hand,
`method: activation` through the CLI to the exact target counts (with `importance.layers: loss` too), the
importance options read and checked from a recipe, log_alpha started from the importance, distillation in
recovery; the KL variants (`importance.layers / heads: kl`) recomputed by hand too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader, RowRange
from cpmctl.model.ant import build_model
from cpmctl.prune.gates import StageMasks
from cpmctl.prune.importance import (
    activation_scores, calibration_batches, drop_one_scores, greedy_head_scores, importance_scores,
)
from cpmctl.prune.recipe import load_prune_recipe
from cpmctl.prune.targets import KINDS
from tests.conftest import tiny_config, write_tiny_ladder
from tests.test_prune_run import FAST, cli

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "prune"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-methods")
    return root, write_tiny_ladder(root)


def test_activation_importance_matches_a_hand_computation(setup):
    root, n = setup
    model = build_model(tiny_config(n, num_layers=1, num_heads=4, dim_ff=48), seed=3).eval()
    batch = PackedReader(PackedDataset(root / "data"), 3, seed=1).next_batch()
    scores = activation_scores(model, list(KINDS), [batch])

    # One layer by hand: embeddings, attention per head, the FFN's intermediate channels; padding (task -1) excluded.
    real = batch["task"] >= 0
    inp, seg, ctx, span = (batch[k] for k in ("input", "segment", "context", "span"))
    pos = torch.arange(inp.shape[1])[None].expand_as(inp)
    with torch.no_grad():
        h0 = model.embed(inp, seg)
        bias = model.attention_bias(seg, ctx.bool(), span, pos, seg, ctx.bool(), span, pos)
        block = model.encoder.layers[0]
        att = block.self_att.self_attention
        x = block.self_att.layernorm_before_attention(h0)
        head, dh = 2, 16
        rows = slice(head * dh, (head + 1) * dh)
        q, k, v = (x @ getattr(att, p).weight[rows].T for p in ("project_q", "project_k", "project_v"))
        probs = torch.softmax(q @ k.transpose(1, 2) / dh**0.5 + bias[:, head], dim=-1)
        head_out = probs @ v  # (b, n, dh)
        assert torch.allclose(scores["heads"][head], head_out.norm(dim=-1)[real].mean(), rtol=1e-4)

        h1 = h0 + block.self_att(h0, bias)
        attn_norm = block.self_att(h0, bias).norm(dim=-1)[real].mean()
        assert torch.allclose(scores["attention"][0], attn_norm, rtol=1e-4)
        y = block.ffn.layernorm_before_ffn(h1)
        ffn = block.ffn.ffn
        channel = 7
        act = F.gelu(y @ ffn.w_in.w_0.weight[channel]) * (y @ ffn.w_in.w_1.weight[channel])
        assert torch.allclose(scores["channels"][0, channel], act.abs()[real].mean(), rtol=1e-4)
        assert torch.allclose(scores["ffn"][0], block.ffn(h1).norm(dim=-1)[real].mean(), rtol=1e-4)
        # importance.channels: output: the mean norm of what the channel alone writes, act_j * w_out[:, j].
        written = (act[..., None] * ffn.w_out.weight[:, channel]).norm(dim=-1)[real].mean()
        out = importance_scores(model, ["channels"], [batch], {}, channels="output")["channels"]
        assert torch.allclose(out[0, channel], written, rtol=1e-4)
        assert not torch.equal(out.argsort(dim=1), scores["channels"].argsort(dim=1))  # another ranking
    assert scores["channels"].shape == (1, 48) and scores["heads"].shape == (4,)


def test_method_activation_runs_through_the_cli_to_the_exact_target(setup, capsys, tmp_path):
    root, _ = setup
    code, out, err = cli(["prune", "--model", root / "m0", "--from", root / "t0.json", "--to", root / "t2.json",
                          "--data", root / "data", "--out", tmp_path / "a", "--json", *FAST, "method=activation",
                          "importance.layers=norm", "importance.heads=norm",
                          "recovery.steps=2", "data.calibration_batches=2", "distill.weight=0.5",
                          "distill.recovery=true"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["method"] == "activation"
    assert report["shape"]["attention_layers_kept"] == 3 and report["shape"]["ffn_layers_kept"] == 2
    assert report["shape"]["num_heads"] == 2 and report["shape"]["dim_ff"] == 20
    assert report["extraction_max_abs_diff"] < 1e-5 and "mask_steps" not in report["mask_phase"]
    assert not (tmp_path / "a" / "stage-1-t0-to-t2" / "mask").exists()  # no mask phase was run

    # The kept heads are the top-2 of the importance on the same seeded calibration rows of the training split.
    from cpmctl.model.checkpoint import load_model

    model, _ = load_model(root / "m0")
    data = PackedDataset(root / "data")
    rows = RowRange(data, 0, len(data) - 8)  # FAST holds out data.valid_rows=8
    heads = activation_scores(model, ["heads"], calibration_batches(rows, 4, 2, seed=1))["heads"]
    assert report["kept"]["heads"] == sorted(torch.topk(heads, 2).indices.tolist())

    # distill.recovery: the recovery loss includes the KL term
    log = (tmp_path / "a" / "stage-1-t0-to-t2" / "recovery" / "metrics.jsonl").read_text().splitlines()
    assert any("kd" in json.loads(line) for line in log)


def test_log_alpha_from_importance_orders_the_gates_as_the_importance(setup):
    root, n = setup
    config = tiny_config(n, num_layers=4, num_heads=4, dim_ff=48)
    masks = StageMasks(config, list(KINDS))
    g = torch.Generator().manual_seed(0)
    scores = {"attention": torch.rand(4, generator=g), "ffn": torch.rand(4, generator=g),
              "heads": torch.rand(4, generator=g), "channels": torch.rand(4, 48, generator=g)}
    masks.init_from_scores(scores, mean=3.0, spread=2.0)
    for kind, score in scores.items():
        alpha = masks.gates[kind].log_alpha.detach()
        assert torch.equal(alpha.argsort(dim=-1), score.argsort(dim=-1)), kind
        assert float(alpha.min()) == pytest.approx(1.0) and float(alpha.max()) == pytest.approx(5.0)
    sel = masks.select({"attention": 2, "ffn": 3, "heads": 1, "channels": 10})
    assert sel.attention_keep.tolist() == [bool(i in torch.topk(scores["attention"], 2).indices) for i in range(4)]
    assert int(sel.head_keep.nonzero()) == int(scores["heads"].argmax())
    assert torch.equal(sel.channel_keep, torch.zeros(4, 48).scatter_(1, torch.topk(scores["channels"], 10).indices, 1).bool())


def test_distill_recovery_without_a_weight_is_an_error():
    with pytest.raises(CpmctlError, match="distill.recovery: needs distill.weight > 0"):
        load_prune_recipe(None, ["distill.recovery=true"])


def _hand_loss(model, batches) -> float:
    """Token-weighted cross-entropy over the target positions, from the full logits (no importance module)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input"], b["segment"], b["context"], b["span"])
            mask = b["target"] != -100
            total += float(F.cross_entropy(logits[mask].float(), b["target"][mask].long(), reduction="sum"))
            count += int(mask.sum())
    return total / count


def test_drop_one_scores_match_a_hand_computation(setup):
    root, n = setup
    model = build_model(tiny_config(n, num_layers=3, num_heads=4, dim_ff=48,
                                    mask_modules=[[False, False], [False, True], [False, False]]), seed=5).eval()
    reader = PackedReader(PackedDataset(root / "data"), 4, seed=2)
    batches = [reader.next_batch() for _ in range(2)]
    scores = drop_one_scores(model, ["attention", "ffn"], batches)
    assert scores["attention"].shape == (3,) and scores["ffn"].shape == (2,)  # layer 1 has no FFN sub-block
    assert all(b.attention_gate is None and b.ffn_gate is None for b in model.encoder.layers)  # gates cleared

    full = _hand_loss(model, batches)
    for kind, layers in (("attention", [0, 1, 2]), ("ffn", [0, 2])):
        for j, i in enumerate(layers):
            cut = copy.deepcopy(model)  # the sub-block removed: a block without it is an identity residual
            setattr(cut.encoder.layers[i], "self_att" if kind == "attention" else "ffn", None)
            assert float(scores[kind][j]) == pytest.approx(_hand_loss(cut, batches) - full, abs=1e-5), (kind, i)
    assert float(scores["attention"].abs().max()) > 1e-4  # a score that can tell sub-blocks apart


def _hand_kl(full, cut, batches) -> float:
    """Mean KL(p_full || p_cut) = sum_v p (log p - log q) over the target positions, from the full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            mask = b["target"] != -100
            logp, logq = (torch.log_softmax(m(b["input"], b["segment"], b["context"], b["span"])[mask].float(), -1)
                          for m in (full, cut))
            total += float((logp.exp() * (logp - logq)).sum())
            count += int(mask.sum())
    return total / count


def test_kl_drop_one_scores_match_a_hand_computation(setup):
    root, n = setup
    model = build_model(tiny_config(n, num_layers=3, num_heads=4, dim_ff=48,
                                    mask_modules=[[False, False], [False, True], [False, False]]), seed=5).eval()
    reader = PackedReader(PackedDataset(root / "data"), 4, seed=2)
    batches = [reader.next_batch() for _ in range(2)]
    assert any(bool((b["target"] == -100).any()) for b in batches)  # positions without a target are left out
    scores = drop_one_scores(model, ["attention", "ffn"], batches, "kl")
    assert scores["attention"].shape == (3,) and scores["ffn"].shape == (2,)
    assert all(b.attention_gate is None and b.ffn_gate is None for b in model.encoder.layers)  # gates cleared
    for kind, layers in (("attention", [0, 1, 2]), ("ffn", [0, 2])):
        for j, i in enumerate(layers):
            cut = copy.deepcopy(model)
            setattr(cut.encoder.layers[i], "self_att" if kind == "attention" else "ffn", None)
            hand = _hand_kl(model, cut, batches)
            assert float(scores[kind][j]) == pytest.approx(hand, rel=1e-4, abs=1e-6), (kind, i)
    assert float(torch.cat([scores["attention"], scores["ffn"]]).min()) > 0  # a KL: positive for a real change


def _without_sub_blocks(model, removed):
    """A copy without the (kind, layer) sub-blocks `removed`: each block an identity residual there."""
    cut = copy.deepcopy(model)
    for kind, i in removed:
        setattr(cut.encoder.layers[i], "self_att" if kind == "attention" else "ffn", None)
    return cut


def test_greedy_sub_block_search_matches_a_hand_search(setup):
    """layer_search greedy: 2 of 4 attention and 1 of 3 FFN sub-blocks removed one at a time, each round the removal
    whose copy (with the earlier removals) has the lowest hand-computed loss; the top-k of the scores is that set."""
    root, n = setup
    model = build_model(tiny_config(n, num_layers=4, num_heads=4, dim_ff=48,
                                    mask_modules=[[False, False], [False, True], [False, False], [False, False]]),
                        seed=7).eval()
    reader = PackedReader(PackedDataset(root / "data"), 4, seed=3)
    batches = [reader.next_batch() for _ in range(2)]
    targets = {"attention": 2, "ffn": 2}
    scores = importance_scores(model, ["attention", "ffn"], batches, targets, layers="loss", heads="loss",
                               layer_search="greedy")
    assert all(b.attention_gate is None and b.ffn_gate is None for b in model.encoder.layers)  # gates cleared

    layers = {"attention": [0, 1, 2, 3], "ffn": [0, 2, 3]}
    left = {"attention": 2, "ffn": 1}
    removed = []
    while any(left.values()):
        tried = [(k, i) for k in ("attention", "ffn") if left[k] for i in layers[k] if (k, i) not in removed]
        losses = [_hand_loss(_without_sub_blocks(model, removed + [c]), batches) for c in tried]
        best = tried[min(range(len(tried)), key=lambda c: losses[c])]
        assert sorted(losses)[1] - min(losses) > 1e-5  # the hand search's choice is not a tie
        removed.append(best)
        left[best[0]] -= 1
    for kind in ("attention", "ffn"):
        kept = {layers[kind][j] for j in torch.topk(scores[kind], targets[kind]).indices.tolist()}
        assert kept == {i for i in layers[kind] if (kind, i) not in removed}, kind
    order = sorted(removed, key=lambda r: float(scores[r[0]][layers[r[0]].index(r[1])]))
    assert order == removed  # removed first = lowest score

    # With one removal per kind the search is drop-one's argmin; a norm search is refused when the recipe loads.
    one = importance_scores(model, ["attention"], batches, {"attention": 3}, layers="loss", layer_search="greedy")
    drop = drop_one_scores(model, ["attention"], batches)
    assert int(one["attention"].argmin()) == int(drop["attention"].argmin())
    with pytest.raises(CpmctlError, match="importance.layer_search: greedy searches by loss or kl"):
        load_prune_recipe(None, ["importance.layer_search=greedy", "importance.layers=norm"])


def _without_heads(model, dropped: list[int], dh: int = 16):
    """A copy whose heads `dropped` are removed in every layer: their attention_out columns zeroed."""
    cut = copy.deepcopy(model)
    with torch.no_grad():
        for block in cut.encoder.layers:
            for j in dropped:
                block.self_att.self_attention.attention_out.weight[:, j * dh:(j + 1) * dh] = 0
    return cut


def test_greedy_head_search_matches_a_hand_computation(setup):
    root, n = setup
    # seed 11: keeping 1 of 4, the forward search and a backward one would pick different heads
    model = build_model(tiny_config(n, num_layers=2, num_heads=4, dim_ff=48), seed=11).eval()
    reader = PackedReader(PackedDataset(root / "data"), 4, seed=3)
    batches = [reader.next_batch() for _ in range(2)]
    # Keep 1 of 4 (forward): the head with the lowest loss on its own.
    alone = [_hand_loss(_without_heads(model, [i for i in range(4) if i != j]), batches) for j in range(4)]
    best = min(range(4), key=lambda j: alone[j])
    assert int(greedy_head_scores(model, batches, 1).argmax()) == best
    # Keep 2 of 4 (backward): twice drop the head whose removal leaves the lowest loss.
    kept = [0, 1, 2, 3]
    for _ in range(2):
        kept.remove(min(kept, key=lambda j: _hand_loss(_without_heads(model, [i for i in range(4) if i not in kept]
                                                                      + [j]), batches)))
    scores = greedy_head_scores(model, batches, 2)
    assert sorted(torch.topk(scores, 2).indices.tolist()) == kept
    assert all(b.self_att.self_attention.head_gate is None for b in model.encoder.layers)  # gates cleared

    # score "kl": the same searches by the KL from the full model's predictions
    alone = [_hand_kl(model, _without_heads(model, [i for i in range(4) if i != j]), batches) for j in range(4)]
    assert int(greedy_head_scores(model, batches, 1, "kl").argmax()) == min(range(4), key=lambda j: alone[j])
    kept = [0, 1, 2, 3]
    for _ in range(2):
        kept.remove(min(kept, key=lambda j: _hand_kl(model, _without_heads(model, [i for i in range(4) if i not in kept]
                                                                           + [j]), batches)))
    assert sorted(torch.topk(greedy_head_scores(model, batches, 2, "kl"), 2).indices.tolist()) == kept


def test_joint_width_search_matches_a_hand_search(setup):
    """width_search joint: the channel cut from the whole model's mean activations, the greedy head search on a copy
    with the other channels' w_out columns zeroed; the channel scores are the whole model's."""
    root, n = setup
    model = build_model(tiny_config(n, num_layers=2, num_heads=4, dim_ff=48), seed=1).eval()
    reader = PackedReader(PackedDataset(root / "data"), 4, seed=3)
    batches = [reader.next_batch() for _ in range(2)]
    targets = {"heads": 2, "channels": 12}
    joint = importance_scores(model, ["heads", "channels"], batches, targets, "loss", "loss", width_search="joint")
    separate = importance_scores(model, ["heads", "channels"], batches, targets, "loss", "loss",
                                 width_search="separate")
    assert all(b.self_att.self_attention.head_gate is None and b.ffn.ffn.channel_gate is None
               for b in model.encoder.layers)  # gates cleared

    cut = copy.deepcopy(model)
    keep = torch.topk(activation_scores(model, ["channels"], batches)["channels"], 12, dim=1).indices
    with torch.no_grad():
        for row, block in zip(keep, cut.encoder.layers):
            dropped = torch.ones(48, dtype=torch.bool)
            dropped[row] = False
            block.ffn.ffn.w_out.weight[:, dropped] = 0
    kept = [0, 1, 2, 3]
    for _ in range(2):
        kept.remove(min(kept, key=lambda j: _hand_loss(_without_heads(cut, [i for i in range(4) if i not in kept]
                                                                      + [j]), batches)))
    assert sorted(torch.topk(joint["heads"], 2).indices.tolist()) == kept
    assert sorted(torch.topk(separate["heads"], 2).indices.tolist()) != kept  # the cut changes the choice here
    assert torch.equal(joint["channels"], separate["channels"])
    assert load_prune_recipe(None).importance.width_search == "joint"  # the default
    for name in ("mini.yaml", "10b-7b.yaml"):
        assert load_prune_recipe(RECIPES / name).importance.width_search == "joint", name


def test_importance_options_are_read_and_checked_from_a_recipe(tmp_path):
    default = load_prune_recipe(None).importance
    assert (default.layers, default.heads) == ("loss", "loss")
    for name in ("mini.yaml", "10b-7b.yaml"):
        shipped = load_prune_recipe(RECIPES / name).importance
        assert (shipped.layers, shipped.heads) == ("loss", "loss"), name
    path = tmp_path / "r.yaml"
    path.write_text("method: activation\nimportance:\n  layers: norm\n  heads: loss\n")
    recipe = load_prune_recipe(path)
    assert (recipe.importance.layers, recipe.importance.heads) == ("norm", "loss")
    with pytest.raises(CpmctlError) as e:
        load_prune_recipe(path, ["importance.layers=grad"])
    assert str(e.value).startswith("importance.layers: expected one of 'norm' | 'loss' | 'kl', got 'grad'")
    assert "\n" not in str(e.value)
    recipe = load_prune_recipe(path, ["importance.layers=kl", "importance.heads=kl"])
    assert (recipe.importance.layers, recipe.importance.heads) == ("kl", "kl")
    assert recipe.importance.channels == "activation"
    assert load_prune_recipe(path, ["importance.channels=output"]).importance.channels == "output"
    with pytest.raises(CpmctlError, match="importance.channels: expected one of 'activation' | 'output'"):
        load_prune_recipe(path, ["importance.channels=norm"])


def test_default_importance_keeps_the_top_drop_one_sub_blocks_and_the_greedy_heads(setup, capsys, tmp_path):
    root, _ = setup
    code, out, err = cli(["prune", "--model", root / "m0", "--from", root / "t0.json", "--to", root / "t2.json",
                          "--data", root / "data", "--out", tmp_path / "a", "--json", *FAST, "method=activation",
                          "recovery.steps=1", "data.calibration_batches=2"], capsys)  # the default: loss, loss
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    from cpmctl.model.checkpoint import load_model

    model, _ = load_model(root / "m0")
    data = PackedDataset(root / "data")
    batches = calibration_batches(RowRange(data, 0, len(data) - 8), 4, 2, seed=1)
    scores = drop_one_scores(model, ["attention", "ffn"], batches)
    assert report["kept"]["attention_layers"] == sorted(torch.topk(scores["attention"], 3).indices.tolist())
    assert report["kept"]["ffn_layers"] == sorted(torch.topk(scores["ffn"], 2).indices.tolist())
    # heads: the greedy search with the stage's channel cut in place (width_search joint, hand-checked above)
    heads = importance_scores(model, ["heads", "channels"], batches, {"heads": 2, "channels": 20}, "loss", "loss",
                              width_search="joint")["heads"]
    assert report["kept"]["heads"] == sorted(torch.topk(heads, 2).indices.tolist())


def test_gates_start_from_the_recipes_importance_scores(setup, capsys, tmp_path, monkeypatch):
    """gates.init: activation ranks log_alpha by the scores `importance.layers` asks for (drop-one here), not by
    the activation norms: the scores the mask phase starts from are the drop-one scores of the source model."""
    root, _ = setup
    seen = {}
    original = StageMasks.init_from_scores

    def spy(self, scores, mean, spread):
        seen.update({k: v.clone() for k, v in scores.items()})
        return original(self, scores, mean, spread)

    monkeypatch.setattr(StageMasks, "init_from_scores", spy)
    code, out, err = cli(["prune", "--model", root / "m0", "--from", root / "t0.json", "--to", root / "t1.json",
                          "--data", root / "data", "--out", tmp_path / "g", "--json", *FAST, "gates.init=activation",
                          "importance.layers=loss", "mask.steps=1", "recovery.steps=1", "recovery.batch_size=4",
                          "data.calibration_batches=2"], capsys)
    assert code == 0, err
    from cpmctl.model.checkpoint import load_model

    model, _ = load_model(root / "m0")
    data = PackedDataset(root / "data")
    batches = calibration_batches(RowRange(data, 0, len(data) - 8), 4, 2, seed=1)
    expected = drop_one_scores(model, ["attention", "ffn"], batches)
    norms = activation_scores(model, ["attention", "ffn"], batches)
    for kind in ("attention", "ffn"):
        assert torch.allclose(seen[kind], expected[kind], atol=1e-6), kind
    assert not all(torch.equal(expected[k].argsort(), norms[k].argsort()) for k in ("attention", "ffn"))
