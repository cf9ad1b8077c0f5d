"""`cpmctl tune lora` end to end on tiny models and the task fixtures: the tuned adapter beats the untuned model,
only LoRA weights move, resume after an interruption is exact, the adapter serves `eval` and `generate` unmerged,
and bad input fails with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cpmctl.cli.app import main
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import save_native
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.train.loop import TrainingInterrupted
from cpmctl.model import lora as L
from cpmctl.tune.recipe import load_tune_recipe
from cpmctl.tune.tuning import EarlyStop, EpochTracker, prepare_run
from tests.conftest import tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
# Small, fast settings: one step per epoch on the 4 lcsts examples, greedy dev decoding.
FAST = ["train.device=cpu", "train.valid_batches=0", "train.log_every=5", "train.save_every=5", "train.warmup_steps=1",
        "train.schedule=constant", "decode.decode=greedy", "decode.max_new_tokens=20"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_vocab):
    root = tmp_path_factory.mktemp("tune")
    vocab = root / "vocab.txt"  # the tiny vocabulary plus what option scoring needs: "否", and "确" of [是否正确]
    vocab.write_text(tiny_vocab.read_text(encoding="utf-8") + "否\n确\n", encoding="utf-8")
    model = build_model(tiny_config(CPMAntTokenizer(vocab).vocab_size), seed=0)
    return save_native(model, root / "base", vocab=vocab)


@pytest.fixture(scope="module")
def memorise(tmp_path_factory):
    """The lcsts fixture's train split as train, dev and test: a random tiny model can only learn what it saw."""
    root = tmp_path_factory.mktemp("memorise")
    for split in ("train", "dev", "test"):
        shutil.copy(FIXTURES / "lcsts" / "train.jsonl", root / f"{split}.jsonl")
    return root


@pytest.fixture(scope="module")
def tuned(base, memorise, tmp_path_factory):
    """One real tuning run, shared by the tests below; returns (run, summary, frozen weights before training)."""
    out = tmp_path_factory.mktemp("run") / "out"
    recipe = load_tune_recipe(None, FAST + ["train.batch_size=4", "train.lr=0.02", "train.grad_clip=0",
                                            "tune.epochs=50", "tune.patience=0"], task="lcsts")
    run = prepare_run(base, memorise, out, recipe, log=lambda *a: None)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    summary = run.fit(progress=False)
    return run, summary, frozen


def test_tuned_adapter_beats_the_untuned_model(tuned, base, memorise, tmp_path, capsys):
    run, summary, _ = tuned
    adapter = Path(summary["adapter"])
    assert (adapter / L.ADAPTER_CONFIG).exists() and summary["best"]["score"] > 0
    scores = {}
    for name, extra in (("untuned", []), ("tuned", ["--adapter", str(adapter)])):
        code, stdout, err = _run(["eval", "--task", "lcsts", "--data", str(memorise), "--model", str(base), *extra,
                                  "--decode", "greedy", "--max-new-tokens", "20", "--device", "cpu",
                                  "--out", str(tmp_path / name), "--json"], capsys)
        assert code == 0, err
        scores[name] = json.loads(stdout)["metrics"]["rouge-l"]
    assert scores["tuned"] >= scores["untuned"] + 25, scores
    # The adapter picked as best scores on eval what it scored on dev during tuning (same data, same decoding).
    assert scores["tuned"] == pytest.approx(summary["best"]["score"], abs=1e-6)


def test_only_lora_weights_change(tuned):
    run, summary, frozen = tuned
    assert summary["steps"] > 0
    after = dict(run.model.named_parameters())
    assert frozen and all(torch.equal(after[n], t) for n, t in frozen.items())  # bit-identical
    moved = [n for n, p in after.items() if p.requires_grad and L.is_lora_parameter(n) and ".lora_B." in n
             and p.abs().max() > 0]
    assert moved  # lora_B starts at zero: these trained


def test_run_directory_and_summary(tuned):
    _, summary, _ = tuned
    out = Path(summary["out"])
    assert json.loads((out / "tune_result.json").read_text())["best"] == summary["best"]
    dev = [json.loads(line) for line in (out / "dev.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in dev] == list(range(1, len(dev) + 1))
    assert summary["epochs"] == 50 and not summary["stopped_early"]
    latest = out / (out / "latest").read_text().strip()
    assert (latest / L.ADAPTER_WEIGHTS).exists()  # each step checkpoint is itself an adapter
    meta = json.loads((out / "best" / L.ADAPTER_META).read_text())
    assert meta["task"] == "lcsts" and meta["epoch"] == summary["best"]["epoch"]


def test_early_stopping_keeps_the_best_epoch():
    scores = iter([1.0, 3.0, 2.0, 3.0, 2.5, 9.0])
    saved = []
    tracker = EpochTracker(lambda m: {"accuracy": next(scores)}, lambda m, row: saved.append(row["epoch"]),
                           "accuracy", patience=3, log=lambda *a: None)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(EarlyStop):
        for epoch in range(1, 7):
            tracker.end_epoch(epoch, 10 * epoch, model)
    # 3.0 at epoch 2; epochs 3, 4 (a tie is no improvement) and 5 do not beat it: stop before seeing epoch 6.
    assert saved == [1, 2] and tracker.best == {"epoch": 2, "step": 20, "score": 3.0}
    assert tracker.stopped and len(tracker.history) == 5 and model.training
    restored = EpochTracker(None, None, "accuracy", patience=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.evaluated(5) and restored.best == tracker.best and restored.bad_epochs == 3


def test_generate_with_adapter_equals_the_merged_model(tuned, base, tmp_path, capsys):
    adapter = tuned[1]["adapter"]
    code, _, err = _run(["tune", "merge", "--model", str(base), "--adapter", adapter, "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 0, err
    texts = []
    for argv in (["--model", str(base), "--adapter", adapter], ["--model", str(tmp_path / "m")]):
        code, stdout, err = _run(["generate", "今天天气不错", *argv, "--decode", "greedy",
                                  "--max-new-tokens", "8", "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        texts.append(json.loads(stdout)["token_ids"])
    assert texts[0] == texts[1]


def test_resume_after_an_interruption_is_exact(base, tmp_path):
    """ccpm (option scoring): stop in the middle of the run, resume, and land on the uninterrupted run's adapter."""
    overrides = FAST + ["train.batch_size=4", "train.lr=0.02", "tune.epochs=3", "tune.patience=0",
                        "train.save_every=2"]
    recipe = lambda: load_tune_recipe(None, overrides, task="ccpm", template="cpmctl")  # noqa: E731
    data = FIXTURES / "ccpm"
    full = prepare_run(base, data, tmp_path / "full", recipe(), log=lambda *a: None).fit(progress=False)

    run = prepare_run(base, data, tmp_path / "cut", recipe(), log=lambda *a: None)
    evaluate = run.tracker.evaluate

    def interrupt_at_epoch_2(model):
        if len(run.tracker.history) == 1:
            raise KeyboardInterrupt  # as a Ctrl-C inside the step would
        return evaluate(model)

    run.tracker.evaluate = interrupt_at_epoch_2
    with pytest.raises(TrainingInterrupted):
        run.fit(progress=False)
    assert not (tmp_path / "cut" / "tune_result.json").exists()
    resumed = prepare_run(base, data, tmp_path / "cut", recipe(), resume=True, log=lambda *a: None).fit(progress=False)
    assert [r["score"] for r in resumed["history"]] == [r["score"] for r in full["history"]]
    assert resumed["steps"] == full["steps"]
    a = L.read_adapter(tmp_path / "full" / "best").state
    b = L.read_adapter(tmp_path / "cut" / "best").state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_counts_without_weights(base, capsys):
    code, stdout, err = _run(["tune", "lora", "--dry-run", "--json", "--model", "10b"], capsys)
    assert code == 0, err
    counts = json.loads(stdout)
    assert counts["trainable"] == 6_291_456 and counts["total"] == counts["frozen"] + 6_291_456
    code, stdout, _ = _run(["tune", "lora", "--dry-run", "--json", "--model", str(base), "lora.r=4",
                            "lora.targets=[project_q,project_k,project_v]"], capsys)
    cfg = tiny_config(10)  # 2 layers, dim_model 64, 4 heads x 16
    assert code == 0 and json.loads(stdout)["trainable"] == cfg.num_layers * 3 * (4 * 64 + 64 * 4)


# ----- bad input -------------------------------------------------------------------------------------------------
def _task_dir(tmp_path, task, edit=None, drop=None):
    d = tmp_path / f"data-{task}"
    shutil.copytree(FIXTURES / task, d)
    if drop:
        (d / f"{drop}.jsonl").unlink()
    if edit:
        split, line_no, text = edit
        lines = (d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        lines[line_no - 1] = text
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.mark.parametrize("task, edit, drop, message", [
    ("lcsts", None, "dev", "no dev.jsonl"),
    ("lcsts", ("train", 3, '{"input": "半行'), None, "train.jsonl:3: not valid JSON"),
    ("lcsts", ("train", 2, '{"input": "只有输入"}'), None, "train.jsonl:2: missing field 'target'"),
    ("ccpm", ("train", 2, '{"input": "一句话", "options": ["甲", "乙"], "label": 7}'), None,
     "train.jsonl:2: label 7 out of range for 2 options"),
])
def test_bad_task_data(base, tmp_path, capsys, task, edit, drop, message):
    data = _task_dir(tmp_path, task, edit, drop)
    code, _, err = _run(["tune", "lora", "--task", task, "--template", "cpmctl", "--model", str(base), "--data",
                         str(data), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["lora.targets=[q_proj]"], "lora.targets: unknown module 'q_proj'"),
    (["tune.metric=bleu-4"], "tune.metric: task lcsts reports rouge-l"),
    (["train.batch_size=64"], "fewer than one step"),
    (["train.engine=fsdp"], "runs under torchrun"),
])
def test_bad_settings(base, tmp_path, capsys, args, message):
    code, _, err = _run(["tune", "lora", "--task", "lcsts", "--model", str(base), "--data", str(FIXTURES / "lcsts"),
                         "--out", str(tmp_path / "out"), *FAST, *args], capsys)
    assert code == 2 and message in err, err


def test_adapter_from_another_model_shape_is_refused(base, tmp_path, capsys):
    other = build_model(tiny_config(300, dim_model=32, num_heads=2), seed=0)
    L.save_adapter(L.inject_lora(other, L.LoraSettings()), tmp_path / "adapter", L.LoraSettings())
    for argv in (["generate", "你好", "--model", str(base)],
                 ["eval", "--task", "lcsts", "--data", str(FIXTURES / "lcsts"), "--model", str(base)]):
        code, _, err = _run([*argv, "--adapter", str(tmp_path / "adapter"), "--device", "cpu"], capsys)
        assert code == 2 and "was trained on another model shape" in err and "dim_model 32 != 64" in err, err
