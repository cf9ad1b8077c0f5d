"""The main job end to end through the real CLI: `cpmctl run recipes/lifecycle/mini.yaml` with smaller overrides
(a slice of the bundled corpus, a few training steps, one pruning stage), then a rerun that skips every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "cpmctl" / "assets"


def _slice_jsonl(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


def _task_slice(dst: Path) -> Path:
    dst.mkdir()
    for split, n in (("train", 48), ("dev", 8), ("test", 8)):
        _slice_jsonl(ASSETS / "tasks" / "lcsts-mini" / f"{split}.jsonl", dst / f"{split}.jsonl", n)
    return dst


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cpmctl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_lifecycle_runs_end_to_end_and_resumes(tmp_path):
    corpus = _slice_jsonl(ASSETS / "corpus" / "batch1.jsonl", tmp_path / "corpus.jsonl", 400)
    batch2 = _slice_jsonl(ASSETS / "corpus" / "batch2.jsonl", tmp_path / "batch2.jsonl", 60)
    task = _task_slice(tmp_path / "task")
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        f"data.input=[{corpus}]",
        f"data.next_batch=[{batch2}]",
        "data.vocab_size=3000",
        "data.max_length=128",
        "data.valid_fraction=0.1",
        "data.workers=1",
        "pretrain.overrides=[train.steps=6,train.batch_size=4,train.valid_every=3,train.valid_batches=2,"
        "train.save_every=3,train.log_every=2]",
        "prune.target=mini-7b",
        "prune.overrides=[mask.steps=3,mask.batch_size=4,mask.save_every=2,recovery.steps=3,recovery.batch_size=4,"
        "recovery.valid_every=3,recovery.save_every=2,data.valid_rows=8,data.eval_batches=2]",
        f"tune.data={task}",
        "tune.overrides=[tune.epochs=1,train.batch_size=8,decode.max_new_tokens=6]",
        "tune.eval_limit=4",
        "generate.prompts=[今天天气很好，]",
        "generate.max_new_tokens=5",
    ]
    recipe = str(REPO / "recipes" / "lifecycle" / "mini.yaml")
    first = _run(["run", recipe, *overrides, "--json"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    objects = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    stages = [o["stage"] for o in objects if "stage" in o]
    assert stages == ["filter", "dedup", "vocab", "pack", "pretrain", "prune", "tune", "eval", "generate"]

    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("## Data", "## Pretraining", "## Pruning", "## Evaluation", "## Sample generations", "## Timings"):
        assert heading in report, heading
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    dedup = state["stages"]["dedup"]["results"]
    # The second batch is deduplicated against the store the first batch filled.
    assert dedup[1]["store_paragraphs"] > dedup[0]["store_paragraphs"]
    assert (run_dir / "pretrain" / "final" / "model.safetensors").exists()
    generations = (run_dir / "generate").glob("*.jsonl")
    assert any(json.loads(line)["prompt"] == "今天天气很好，" for g in generations for line in g.read_text().splitlines())

    # A rerun skips every finished stage.
    second = _run(["run", recipe, *overrides], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("skipped") == 9


def test_bad_stage_name_is_one_line_error(tmp_path):
    recipe = str(REPO / "recipes" / "lifecycle" / "mini.yaml")
    proc = _run(["run", recipe, f"run_dir={tmp_path / 'r'}", "--only", "nonsense"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
