"""Selection methods of `cpmctl prune`: activation importance (Minitron) recomputed by hand, `method: activation`
through the CLI to the exact target counts, log_alpha started from the importance, distillation in recovery."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader, RowRange
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import save_native
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.prune.gates import StageMasks
from cpmctl.prune.importance import activation_scores, calibration_batches
from cpmctl.prune.recipe import load_prune_recipe
from cpmctl.prune.targets import KINDS
from tests.conftest import tiny_config, write_tiny_vocab
from tests.synthetic import write_synthetic_packed
from tests.test_prune_run import FAST, cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-methods")
    vocab = write_tiny_vocab(root / "vocab.txt")
    n = CPMAntTokenizer(vocab).vocab_size
    write_synthetic_packed(root / "data", n, 40, max_length=96, seed=0)
    dropped = [[False, False], [True, False], [False, True], [False, True]]
    tiny_config(n, num_layers=4, num_heads=4, dim_ff=48).save(root / "t0.json")
    tiny_config(n, num_layers=4, num_heads=2, dim_ff=20, mask_modules=dropped).save(root / "t2.json")
    save_native(build_model(tiny_config(n, num_layers=4, num_heads=4, dim_ff=48), seed=0), root / "m0", vocab=vocab)
    return root, n


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
    assert scores["channels"].shape == (1, 48) and scores["heads"].shape == (4,)


def test_method_activation_runs_through_the_cli_to_the_exact_target(setup, capsys, tmp_path):
    root, _ = setup
    code, out, err = cli(["prune", "--model", root / "m0", "--from", root / "t0.json", "--to", root / "t2.json",
                          "--data", root / "data", "--out", tmp_path / "a", "--json", *FAST, "method=activation",
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
