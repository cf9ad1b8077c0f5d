"""Training metrics: a window that averages step metrics between log rows, the metrics.jsonl writer, and the
experiment trackers (`train.logger`) that receive a copy of every row.

metrics.jsonl is always written; `tensorboard` also writes event files to OUT/tensorboard/ and `wandb` logs a
run under OUT/wandb/ (offline unless WANDB_MODE says otherwise). Each tracker's package is imported only when it
is used, and a missing one is a one-line error naming the pip extra.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.io import atomic_file
from cpmctl.progress import timestamp
from cpmctl.train.engine import Engine

LOGGERS = ("jsonl", "tensorboard", "wandb")


class MetricWindow:
    """Sums of step metrics since the last log row. Losses per objective (`loss/lm`) are weighted by their target
    counts (`targets/lm`); everything else is a plain mean over steps and ranks."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}
        self.tokens = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        for key, value in metrics.items():
            if key.startswith("targets"):
                continue
            weight = 1.0
            if key.startswith("loss/"):
                weight = float(metrics.get("targets/" + key.split("/", 1)[1], 1.0))
            total = self.sums.setdefault(key, [0.0, 0.0])
            total[0] += float(value) * weight
            total[1] += weight
        self.tokens += tokens

    def summarize(self, engine: Engine) -> tuple[dict[str, float], float]:
        """Means over the window and all ranks, and the token count of all ranks; then the window restarts."""
        merged: dict[str, list[float]] = {}
        for sums in engine.all_gather_object(self.sums):
            for key, (value, weight) in sums.items():
                total = merged.setdefault(key, [0.0, 0.0])
                total[0] += value
                total[1] += weight
        tokens = engine.all_reduce_sum([self.tokens])[0]
        self.sums, self.tokens = {}, 0.0
        return {k: v / w for k, (v, w) in merged.items() if w > 0}, tokens

    def state_dict(self) -> dict:
        return {"sums": {k: list(v) for k, v in self.sums.items()}, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: [float(v[0]), float(v[1])] for k, v in state["sums"].items()}
        self.tokens = float(state["tokens"])


class MetricsLog:
    """metrics.jsonl: one JSON object per log row, each with its wall-clock `time`. On resume, rows after the
    resumed step are dropped (they belong to the part of the interrupted run that the checkpoint does not hold), so
    the file tells one consistent story; a tracker (`logger`) is told to drop them too, and gets every new row."""

    def __init__(self, path: Path, write: bool, resume_step: int | None = None, logger: str = "jsonl"):
        self.path, self.write_enabled = path, write
        self.rows: list[dict] = []
        if resume_step is not None and path.exists():
            self.rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        self.tracker = open_tracker(logger, path.parent, resume_step) if write else None
        if write:
            with atomic_file(path) as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        row = {**row, "time": row.get("time") or timestamp()}
        self.rows.append(row)
        if self.write_enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log(row)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


# ----- trackers ------------------------------------------------------------------------------------------------
def scalars(row: dict) -> dict[str, float]:
    """The numbers of a row that a tracker plots: every finite int/float but the step (its x axis)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _missing(logger: str) -> CpmctlError:
    return CpmctlError(f"train.logger={logger} needs the {logger} package: pip install 'cpmctl[{logger}]'")


class TensorBoardTracker:
    """Event files in DIR/tensorboard, one scalar per row key; on resume, events from the resumed step on are
    purged, as metrics.jsonl drops its rows."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        wall = time.time()
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row.get("step"), walltime=wall)
        self.writer.flush()  # a row every log_every steps: flushed at once, so a killed run loses none

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in DIR/wandb, offline unless WANDB_MODE is set (then wandb's own settings apply); its id comes
    from the run directory, so a resumed run continues the same wandb run."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        run_id = "cpmctl-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cpmctl"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), resume="allow", mode=None if "WANDB_MODE" in os.environ else "offline")

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row.get("step"))

    def close(self) -> None:
        self.run.finish()


def open_tracker(logger: str, run_dir: Path, resume_step: int | None = None):
    """The tracker of `train.logger` (None for jsonl: the file is all there is)."""
    if logger == "jsonl":
        return None
    if logger == "tensorboard":
        return TensorBoardTracker(run_dir, resume_step)
    if logger == "wandb":
        return WandbTracker(run_dir, resume_step)
    raise CpmctlError(f"train.logger: expected one of {' | '.join(LOGGERS)}, got {logger!r}")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows
