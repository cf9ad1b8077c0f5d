"""`cpmctl prune` end to end on tiny models: layer and width stages through the real CLI, outputs in both formats,
interruption and exact resume, the whole mini ladder, and bad input rejected before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpmctl.cli.app import main
from cpmctl.model.checkpoint import load_model
from cpmctl.prune import mask_phase
from cpmctl.prune.mask_phase import distillation_kl
from tests.synthetic import write_synthetic_packed
from tests.conftest import REPO, write_tiny_ladder

FAST = ["method=learned", "mask.batch_size=4", "recovery.batch_size=4", "data.valid_rows=8", "data.eval_batches=1",
        "recovery.valid_batches=1", "mask.log_every=1", "recovery.log_every=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    write_tiny_ladder(root)
    return root


def cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def prune_args(root: Path, src: str, dst: str, model, out, *extra):
    return ["prune", "--model", model, "--from", root / f"{src}.json", "--to", root / f"{dst}.json",
            "--data", root / "data", "--out", out, "--json", *FAST, *extra]


def test_layer_then_width_stage_reach_the_exact_target(setup, capsys, tmp_path):
    root = setup
    code, out, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "a", "mask.steps=6",
                                    "recovery.steps=3", "gates.lr=0.5", "distill.weight=0.5"), capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shape"]["attention_layers_kept"] == 3 and report["shape"]["ffn_layers_kept"] == 2
    assert report["extraction_max_abs_diff"] < 1e-5
    assert set(report["loss"]) == {"before", "extracted", "recovered"}
    assert all(v == v for v in report["loss"].values())  # not NaN
    stage = tmp_path / "a" / "stage-1-t0-to-t1"
    assert (stage / "survivors.png").read_bytes()[:4] == b"\x89PNG"
    assert (stage / "mask" / "metrics.jsonl").exists() and (stage / "recovery" / "metrics.jsonl").exists()

    # The original format: .pt + .json, dropped sub-blocks listed in mask_modules and absent from the state dict.
    model, info = load_model(stage / "original" / "model.pt")
    assert info.format == "original"
    assert model.config.mask_modules == report["shape"]["mask_modules"]
    assert sum(a for a, _ in model.config.mask_modules) == 1 and sum(f for _, f in model.config.mask_modules) == 2
    native, _ = load_model(stage / "model")
    for key, value in native.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)

    code, out, _ = cli(["model", "info", stage / "model", "--json"], capsys)
    described = json.loads(out)
    assert (described["attention_layers_kept"], described["ffn_layers_kept"], described["num_heads"],
            described["dim_ff"]) == (3, 2, 4, 48)

    # Width stage from the layer stage's output: the head and channel counts of the target, the layers kept.
    code, out, err = cli(prune_args(root, "t1", "t2", stage / "model", tmp_path / "b", "mask.steps=6",
                                    "recovery.steps=2", "gates.lr=0.5"), capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["shape"]["num_heads"], report["shape"]["dim_ff"]) == (2, 20)
    assert report["shape"]["mask_modules"] == model.config.mask_modules
    ffn_kept = [str(i) for i, (_, ffn_dropped) in enumerate(report["shape"]["mask_modules"]) if not ffn_dropped]
    assert report["kept"]["channels_per_layer"] == {i: 20 for i in ffn_kept}  # the layers stage 1 kept
    assert len(report["kept"]["heads"]) == 2


def test_interrupted_stage_resumes_to_the_same_result(setup, capsys, tmp_path, monkeypatch):
    root = setup
    steps = ["mask.steps=6", "mask.save_every=2", "recovery.steps=4", "recovery.save_every=2", "gates.lr=0.5"]
    code, _, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "straight", *steps), capsys)
    assert code == 0, err

    original_on_step = mask_phase.MaskPhase.on_step

    def interrupt_at_step_5(self, step, model):
        if step == 5:
            raise KeyboardInterrupt
        original_on_step(self, step, model)

    monkeypatch.setattr(mask_phase.MaskPhase, "on_step", interrupt_at_step_5)
    code, out, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "cut", *steps), capsys)
    assert code == 130, err
    assert json.loads(out)["interrupted"] is True
    stage = tmp_path / "cut" / "stage-1-t0-to-t1"
    assert (stage / "mask" / "latest").read_text().strip() == "step-0000004"
    assert not (stage / "extracted").exists() and not (stage / "report.json").exists()

    monkeypatch.setattr(mask_phase.MaskPhase, "on_step", original_on_step)
    code, out, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "cut", *steps), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (stage / "mask" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 only after the resume

    # Same gates, same weights, same selection as the run that was never interrupted.
    straight = tmp_path / "straight" / "stage-1-t0-to-t1"
    assert json.loads((stage / "report.json").read_text())["kept"] == json.loads(
        (straight / "report.json").read_text())["kept"]
    a, b = load_file(stage / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    # A finished stage is skipped on a rerun.
    code, out, _ = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "cut", *steps), capsys)
    assert code == 0 and json.loads(out)["status"].startswith("skipped")


def test_identical_runs_and_a_kill_before_the_first_checkpoint_give_the_same_bytes(setup, capsys, tmp_path,
                                                                                   monkeypatch):
    """Every random draw of a prune run comes from the recipe seed (the gates' initial log_alpha included): two
    identical commands write identical models, and a run killed before its first mask checkpoint and rerun
    writes what the uninterrupted run writes."""
    root = setup
    steps = ["mask.steps=4", "mask.save_every=3", "recovery.steps=2", "gates.lr=0.5", "gates.init_std=0.5"]
    runs = []
    for name in ("one", "two"):
        code, _, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / name, *steps), capsys)
        assert code == 0, err
        runs.append(tmp_path / name / "stage-1-t0-to-t1")
    original_on_step = mask_phase.MaskPhase.on_step

    class Killed(Exception):
        """Stands for SIGKILL: nothing in cpmctl handles it, so nothing is saved on the way out."""

    def killed_at_step_2(self, step, model):
        if step == 2:
            raise Killed
        original_on_step(self, step, model)

    monkeypatch.setattr(mask_phase.MaskPhase, "on_step", killed_at_step_2)
    with pytest.raises(Killed):
        main([str(a) for a in prune_args(root, "t0", "t1", root / "m0", tmp_path / "killed", *steps)])
    capsys.readouterr()
    assert not (tmp_path / "killed" / "stage-1-t0-to-t1" / "mask" / "latest").exists()  # nothing saved yet
    monkeypatch.setattr(mask_phase.MaskPhase, "on_step", original_on_step)
    code, _, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "killed", *steps), capsys)
    assert code == 0, err
    runs.append(tmp_path / "killed" / "stage-1-t0-to-t1")
    want = [(runs[0] / f).read_bytes() for f in ("model/model.safetensors", "extracted/selection.pt")]
    for run in runs[1:]:
        assert [(run / f).read_bytes() for f in ("model/model.safetensors", "extracted/selection.pt")] == want, run


def test_whole_mini_ladder_runs_every_stage(setup, capsys, tmp_path):
    """--from mini-10b --to mini-300m: five stages in turn, each output saved, each stage's shape the ladder's."""
    root = setup
    vocab = root / "vocab.txt"
    code, _, err = cli(["model", "init", "--config", "mini-10b", "--vocab", vocab, "--out", tmp_path / "mini"], capsys)
    assert code == 0, err
    code, out, err = cli(["prune", "--model", tmp_path / "mini", "--from", "mini-10b", "--to", "mini-300m",
                          "--data", root / "data", "--out", tmp_path / "ladder", "--json", *FAST,
                          "mask.batch_size=2", "recovery.batch_size=2", "mask.steps=2", "recovery.steps=1",
                          "recovery.valid_batches=0"], capsys)
    assert code == 0, err
    reports = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["to"] for r in reports] == ["mini-7b", "mini-3b", "mini-2b", "mini-1b", "mini-300m"]
    shapes = [(r["shape"]["attention_layers_kept"], r["shape"]["ffn_layers_kept"], r["shape"]["num_heads"],
               r["shape"]["dim_ff"]) for r in reports]
    assert shapes == [(6, 5, 8, 640), (6, 5, 5, 232), (4, 4, 5, 232), (4, 4, 4, 44), (4, 4, 1, 22)]
    # Layer stages only drop what is still there: 3b -> 2b keeps a subset of 7b's layers.
    kept_7b, kept_2b = set(reports[0]["kept"]["attention_layers"]), set(reports[2]["kept"]["attention_layers"])
    assert kept_2b < kept_7b
    final, _ = load_model(tmp_path / "ladder" / "stage-5-mini-1b-to-mini-300m" / "original" / "model.pt")
    assert final.config.num_heads == 1 and final.config.dim_ff == 22


@pytest.mark.parametrize("src,dst,model,message", [
    ("mini-7b", "mini-10b", "m0", "not reachable"),
    ("t0.json", "wide.json", "m0", "changes dim_model 64 -> 32"),
    ("mini-10b", "mini-7b", "m0", "--model .* has shape .* but --from mini-10b"),
    ("t1.json", "t2.json", "m0", r"but --from \S*t1.json is"),
])
def test_bad_input_fails_before_any_work(setup, capsys, tmp_path, src, dst, model, message):
    root = setup
    resolve = lambda name: root / name if name.endswith(".json") else name  # noqa: E731
    code, out, err = cli(["prune", "--model", root / model, "--from", resolve(src), "--to", resolve(dst),
                          "--data", root / "data", "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_data_with_another_vocabulary_is_rejected(setup, capsys, tmp_path):
    root = setup
    write_synthetic_packed(tmp_path / "other", 500, 12, max_length=96)
    code, _, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "out", "--data", tmp_path / "other"),
                       capsys)
    assert code == 2 and "500-token vocabulary" in err


def test_dry_run_for_the_real_ladder_needs_no_weights(capsys):
    code, out, _ = cli(["prune", "--from", "10b", "--to", "300m", "--dry-run", "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert [s["to"] for s in plan["stages"]] == ["7b", "3b", "2b", "1b", "300m"]
    assert plan["stages"][0]["params_non_embedding"] == 6_509_895_680


def test_recipes_resolve_and_bad_keys_are_named(capsys):
    for name in ("mini", "10b-7b"):
        code, out, _ = cli(["prune", "--recipe", REPO / "recipes" / "prune" / f"{name}.yaml", "--print-recipe"], capsys)
        assert code == 0 and "gates:" in out
    code, _, err = cli(["prune", "--recipe", REPO / "recipes" / "prune" / "mini.yaml", "mask.stepz=3", "--print-recipe"], capsys)
    assert code == 2 and "mask.stepz" in err
    code, _, err = cli(["prune", "method=best", "--print-recipe"], capsys)
    assert code == 2 and "method" in err


def test_distillation_is_temperature_scaled_kl():
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    assert float(distillation_kl(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    t = 3.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distillation_kl(student, teacher, t), expected)


def test_mask_phase_with_frozen_weights_moves_only_the_gates(setup, capsys, tmp_path, monkeypatch):
    """gates.train_weights: false: the mask phase leaves every weight bit-identical to the source model's while
    the gates learn (their log_alpha moves), and the stage still reaches its target."""
    from cpmctl.prune import pipeline

    root = setup
    seen = {}
    original = pipeline.learn_selection

    def spy(stage, model, *args, **kwargs):
        result = original(stage, model, *args, **kwargs)
        seen["weights"] = {k: v.detach().clone() for k, v in result["model"].state_dict().items()}
        seen["requires_grad"] = all(p.requires_grad for p in result["model"].parameters())
        return result

    monkeypatch.setattr(pipeline, "learn_selection", spy)
    code, out, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "f", "mask.steps=4", "recovery.steps=1",
                                    "gates.lr=0.5", "gates.train_weights=false"), capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shape"]["attention_layers_kept"] == 3 and report["shape"]["ffn_layers_kept"] == 2
    source, _ = load_model(root / "m0")
    expected = source.state_dict()
    assert seen["weights"].keys() == expected.keys()
    assert all(torch.equal(seen["weights"][k], expected[k]) for k in expected)
    assert seen["requires_grad"]  # unfrozen again for extraction and recovery
    metrics = [json.loads(line) for line in (tmp_path / "f" / "stage-1-t0-to-t1" / "mask" / "metrics.jsonl").open()]
    assert len([m for m in metrics if "loss" in m]) >= 4
    # DDP and FSDP need a trainable model parameter: refused when the recipe is read, before any work.
    code, out, err = cli(prune_args(root, "t0", "t1", root / "m0", tmp_path / "g", "gates.train_weights=false",
                                    "mask.engine=fsdp"), capsys)
    assert code != 0 and "gates.train_weights: false runs the mask phase in one process" in out + err
    assert not (tmp_path / "g").exists()
