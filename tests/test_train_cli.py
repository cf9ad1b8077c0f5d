"""`cpmctl pretrain` end to end: recipes, --json, resume, continued training from the original format, bad input,
Ctrl-C, and the real data pipeline (data vocab -> data pack -> pretrain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import load_model, read_checkpoint, save_original
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.train.metrics import read_metrics
from tests.synthetic import write_synthetic_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the conftest helpers, with or without tests/__init__.py
from conftest import run_cli, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "recipes" / "pretrain" / "mini.yaml"
BIG = REPO / "recipes" / "pretrain" / "cpm-ant-10b.yaml"


cli = run_cli


@pytest.fixture
def setup(tmp_path, tiny_vocab):
    """A tiny config, the tiny vocabulary, synthetic packed train/valid data, and the overrides that use them."""
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    config = tmp_path / "tiny.json"
    tiny_config(vocab_size).save(config)
    train_dir = write_synthetic_packed(tmp_path / "train", vocab_size, 24, max_length=80, seed=0, words=40)
    valid_dir = write_synthetic_packed(tmp_path / "valid", vocab_size, 8, max_length=80, seed=1, words=40)
    overrides = [f"model.init={config}", f"model.vocab={tiny_vocab}", f"data.train={train_dir}",
                 f"data.valid={valid_dir}", f"out_dir={tmp_path / 'run'}", "train.steps=6", "train.batch_size=4",
                 "train.warmup_steps=2", "train.log_every=2", "train.valid_every=3", "train.valid_batches=2",
                 "train.save_every=3", "train.device=cpu", "train.lr=1e-2"]
    return tmp_path, overrides


def test_recipes_print_and_name_bad_keys(capsys):
    for recipe in (MINI, BIG):
        code, out, _ = cli(capsys, "pretrain", "--recipe", recipe, "--print-recipe")
        assert code == 0 and "train:" in out and "schedule:" in out
        assert recipe.read_text().startswith("#") and "cpmctl pretrain --recipe" in recipe.read_text()
    code, _, err = cli(capsys, "pretrain", "--recipe", MINI, "train.lr=fast")
    assert code == 2 and "train.lr" in err and "Traceback" not in err
    code, _, err = cli(capsys, "pretrain", "--recipe", MINI, "train.lrr=1")
    assert code == 2 and "train.lrr" in err
    code, _, err = cli(capsys, "pretrain", "--recipe", MINI, "train.schedule=exp", "--print-recipe")
    assert code == 2 and "train.schedule" in err


def test_pretrain_writes_final_metrics_and_curve_then_resumes(capsys, setup):
    tmp_path, overrides = setup
    code, out, err = cli(capsys, "pretrain", *overrides, "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    run = tmp_path / "run"
    assert summary["steps"] == 6 and summary["final"] == str(run / "final")
    assert summary["valid_loss"] is not None and summary["tokens_per_s"] > 0
    model, info = load_model(run / "final")
    assert info.vocab is not None and sorted(p.name for p in (run / "final").iterdir()) == [
        "config.json", "model.safetensors", "vocab.txt"]
    assert (run / "loss_curve.png").exists() and len(read_metrics(run / "metrics.jsonl")) == 3 + 2

    # A new run into the same out_dir is refused; --resume continues it to more steps.
    code, _, err = cli(capsys, "pretrain", *overrides)
    assert code == 2 and "resume" in err
    code, out, err = cli(capsys, "pretrain", *overrides, "train.steps=8", "--resume", run, "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 8
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [2, 4, 6, 8]


def test_pretrain_mirrors_its_metrics_to_tensorboard(capsys, setup):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tmp_path, overrides = setup
    code, _, err = cli(capsys, "pretrain", *overrides, "train.logger=tensorboard")
    assert code == 0, err
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("loss")] == [(r["step"], round(r["loss"], 5)) for r in rows]
    assert [e.step for e in acc.Scalars("valid_loss")] == [3, 6]


def test_continue_training_from_an_original_checkpoint_with_a_new_lr(capsys, setup, tiny_vocab):
    tmp_path, overrides = setup
    start = build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=3)
    pt, _ = save_original(start, tmp_path / "orig" / "model.pt", dtype=torch.float16)
    args = [o for o in overrides if not o.startswith("model.")] + [f"model.init={pt}", f"model.vocab={tiny_vocab}",
                                                                    "train.lr=3e-3", "train.schedule=constant"]
    code, out, err = cli(capsys, "pretrain", *args, "--json")
    assert code == 0, err
    assert "continued from" in err and "(original)" in err
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["lr"] == pytest.approx(3e-3 * 2 / 2)  # constant after the 2 warmup steps
    _, trained = read_checkpoint(tmp_path / "run" / "final")
    _, original = read_checkpoint(pt)
    moved = (trained["encoder.layers.0.ffn.ffn.w_out.weight"] - original["encoder.layers.0.ffn.ffn.w_out.weight"].float())
    assert 0 < moved.abs().max() < 1.0  # trained from the checkpoint's weights, not from scratch


def test_vocab_mismatch_fails_before_training(capsys, setup, tmp_path):
    tmp_path, overrides = setup
    other = write_synthetic_packed(tmp_path / "other", 90, 8, max_length=80, seed=0, words=40)
    args = [o for o in overrides if not o.startswith("data.train")] + [f"data.train={other}"]
    code, _, err = cli(capsys, "pretrain", *args)
    assert code == 2 and "data.train" in err and "90-token vocabulary" in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(setup):
    tmp_path, overrides = setup
    args = [o for o in overrides if not o.startswith(("train.steps", "train.log_every"))] + [
        "train.steps=100000", "train.save_every=100000", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "cpmctl", "pretrain", *args, "--json"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 90
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and Path(summary["checkpoint"], "trainer", "state.pt").exists()
    assert "interrupted at step" in err and "--resume" in err


def test_real_pipeline_vocab_pack_pretrain(capsys, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    lines = (REPO / "cpmctl" / "assets" / "corpus" / "batch1.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    assert cli(capsys, "data", "vocab", "-i", corpus, "--size", 1500, "-o", vocab, "--workers", 1)[0] == 0
    packed = tmp_path / "packed"
    assert cli(capsys, "data", "pack", "-i", corpus, "--vocab", vocab, "-o", packed, "--max-length", 128,
               "--valid-fraction", 0.1, "--workers", 1)[0] == 0
    config = tmp_path / "tiny.json"
    tiny_config(1500).save(config)
    code, out, err = cli(capsys, "pretrain", "--recipe", MINI, f"model.init={config}", f"model.vocab={vocab}",
                         f"data.train={packed / 'train'}", f"data.valid={packed / 'valid'}", f"out_dir={tmp_path / 'run'}",
                         "train.steps=4", "train.batch_size=2", "train.valid_batches=1", "train.log_every=2", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["valid_loss"] > 0
    # The packed vocabulary's md5 is checked against the model's: another vocabulary file is refused.
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    tokens[20], tokens[21] = tokens[21], tokens[20]  # same size, other ids
    other = tmp_path / "other.txt"
    other.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    code, _, err = cli(capsys, "pretrain", "--recipe", MINI, f"model.init={config}", f"model.vocab={other}",
                       f"data.train={packed / 'train'}", "data.valid=null", f"out_dir={tmp_path / 'run2'}",
                       "train.steps=1")
    assert code == 2 and "another vocabulary" in err
