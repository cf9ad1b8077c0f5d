"""Distributed pruning on CPU with gloo, 2 processes launched by `cpmctl prune --nproc 2` (real torchrun): an fsdp
stage (mask phase with a sharded teacher + extraction + recovery) and a ddp stage keep the same layers, heads and
channels as one process on the same global batch, with weights within 1e-4; a run stopped after the mask phase's
sharded step-2 checkpoint and resumed from it reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmctl.cli.app import main
from cpmctl.model.checkpoint import read_checkpoint
from cpmctl.train.metrics import read_metrics
from tests.conftest import REPO, write_tiny_ladder

pytestmark = pytest.mark.slow

STAGE = "stage-1-t0-to-t2"
# One stage that shrinks every structure type; distillation on, so the teacher is sharded too.
SETTINGS = ["method=learned", "mask.steps=4", "mask.batch_size=2", "mask.save_every=2", "mask.keep_last=0", "mask.log_every=1",
            "recovery.steps=2", "recovery.batch_size=2", "recovery.log_every=1", "recovery.valid_batches=1",
            "recovery.warmup_steps=1", "data.valid_rows=8", "data.eval_batches=1", "gates.lr=0.5",
            "distill.weight=0.5", "mask.device=cpu", "recovery.device=cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-dist")
    write_tiny_ladder(root, max_length=64, words=40)
    return root


def args(root: Path, out: Path, *extra) -> list[str]:
    return ["prune", "--model", str(root / "m0"), "--from", str(root / "t0.json"), "--to", str(root / "t2.json"),
            "--data", str(root / "data"), "--out", str(out), "--json", *SETTINGS, *extra]


def launch(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "cpmctl", *argv], capture_output=True, text=True, timeout=300,
                         env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def report_of(out: Path) -> dict:
    return json.loads((out / STAGE / "report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """One process, the same global batch: 2 micro-batches of 2 rows = the rows of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("single") / "out"
    with pytest.raises(SystemExit) as e:
        main(args(setup, out, "mask.grad_accum=2", "recovery.grad_accum=2"))
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def fsdp(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    run = launch(*args(setup, out, "mask.engine=fsdp", "recovery.engine=fsdp", "mask.checkpoint_format=sharded",
                       "--nproc", "2"))
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports
    return out


def assert_same_stage(out: Path, reference: Path, exact: bool = False) -> None:
    got, want = report_of(out), report_of(reference)
    assert got["kept"] == want["kept"]
    assert got["shape"] == want["shape"]
    _, state = read_checkpoint(out / STAGE / "model")
    _, expected = read_checkpoint(reference / STAGE / "model")
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if exact:
            assert torch.equal(state[key], value), key
        else:
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-4)
    for phase in ("mask", "recovery"):
        losses = [r["loss"] for r in read_metrics(out / STAGE / phase / "metrics.jsonl") if "loss" in r]
        expected_losses = [r["loss"] for r in read_metrics(reference / STAGE / phase / "metrics.jsonl") if "loss" in r]
        assert losses == (expected_losses if exact else pytest.approx(expected_losses, rel=1e-4)), phase


def test_fsdp_stage_equals_one_process_on_the_same_global_batch(setup, single, fsdp):
    assert_same_stage(fsdp, single)
    lambdas = torch.tensor(report_of(fsdp)["mask_phase"]["lambdas"])
    torch.testing.assert_close(lambdas, torch.tensor(report_of(single)["mask_phase"]["lambdas"]), rtol=1e-4, atol=1e-6)
    shards = sorted(p.name for p in (fsdp / STAGE / "mask" / "step-0000002" / "trainer" / "sharded").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own shards


def test_ddp_stage_equals_one_process_on_the_same_global_batch(setup, single, tmp_path):
    out = tmp_path / "ddp"
    run = launch(*args(setup, out, "--nproc", "2"))  # engine single + --nproc -> ddp, said on stderr
    assert "--nproc: mask.engine single -> ddp" in run.stderr
    assert_same_stage(out, single)


def test_fsdp_mask_phase_resumes_its_sharded_checkpoint_exactly(setup, fsdp, tmp_path):
    # The run as it stood after the mask phase's step-2 checkpoint: later checkpoints and everything after gone.
    out = tmp_path / "resumed"
    shutil.copytree(fsdp, out)
    stage = out / STAGE
    for name in ("extracted", "recovery", "model", "original"):
        shutil.rmtree(stage / name)
    for name in ("report.json", "survivors.png"):
        (stage / name).unlink()
    shutil.rmtree(stage / "mask" / "step-0000004")
    (stage / "mask" / "latest").write_text("step-0000002\n")
    launch(*args(setup, out, "mask.engine=fsdp", "recovery.engine=fsdp", "mask.checkpoint_format=sharded",
                 "--nproc", "2"))
    assert [r["step"] for r in read_metrics(stage / "mask" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert_same_stage(out, fsdp, exact=True)
    assert report_of(out)["mask_phase"] == report_of(fsdp)["mask_phase"]
