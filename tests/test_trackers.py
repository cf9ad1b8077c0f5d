"""`train.logger`: every metrics.jsonl row mirrored to TensorBoard (read back with tensorboard's own event reader)
or to wandb (offline), each row with its wall-clock time; a missing tracker package is a one-line error."""

from __future__ import annotations

import json
import sys

import pytest

from cpmctl import CpmctlError
from cpmctl.train.metrics import MetricsLog, read_metrics

ROWS = [{"step": 10, "loss": 5.5, "lr": 1e-3, "grad_norm": 1.25, "loss/lm": 5.0, "note": "text is not plotted"},
        {"step": 10, "valid_loss": 5.75},
        {"step": 20, "loss": 4.5, "lr": 2e-3, "grad_norm": float("nan")}]


def _scalars(log_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_every_row(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", write=True, logger="tensorboard")
    for row in ROWS:
        log.write(row)
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["time"] for r in rows) and [r["step"] for r in rows] == [10, 10, 20]
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(10, 5.5), (20, 4.5)]
    assert scalars["valid_loss"] == [(10, 5.75)] and scalars["loss/lm"] == [(10, 5.0)]
    assert scalars["lr"] == [(10, pytest.approx(1e-3)), (20, pytest.approx(2e-3))]
    assert scalars["grad_norm"] == [(10, 1.25)]  # a NaN is not plotted
    assert "note" not in scalars and "time" not in scalars and "step" not in scalars


def test_tensorboard_on_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", write=True, logger="tensorboard")
    for step in (10, 20, 30):
        log.write({"step": step, "loss": float(step)})
    log.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", write=True, resume_step=20, logger="tensorboard")
    resumed.write({"step": 30, "loss": 3.0})
    resumed.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10.0, 20.0, 3.0]
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(10, 10.0), (20, 20.0), (30, 3.0)]


def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    for logger in ("tensorboard", "wandb"):
        with pytest.raises(CpmctlError, match=rf"train.logger={logger} needs the {logger} package: "
                                              rf"pip install 'cpmctl\[{logger}\]'"):
            MetricsLog(tmp_path / "metrics.jsonl", write=True, logger=logger)
    # A process that does not write the log (rank > 0) opens no tracker, so it needs no package either.
    MetricsLog(tmp_path / "other.jsonl", write=False, logger="tensorboard").write({"step": 1, "loss": 1.0})


def test_jsonl_rows_keep_a_time_they_were_given(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", write=True)
    log.write({"step": 1, "loss": 1.0, "time": "2026-01-01T00:00:00+00:00"})
    log.write({"step": 2, "loss": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["time"] == "2026-01-01T00:00:00+00:00" and rows[1]["time"][:2] == "20"
    assert log.tracker is None


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "metrics.jsonl", write=True, logger="wandb")
    assert log.tracker.run.settings.mode == "offline"  # offline unless WANDB_MODE says otherwise
    for row in ROWS:
        log.write(row)
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
