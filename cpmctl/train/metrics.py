"""Training metrics: a window that averages step metrics between log rows, and the metrics.jsonl writer."""

from __future__ import annotations

import json
from pathlib import Path

from cpmctl.io import atomic_file
from cpmctl.train.engine import Engine


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
    """metrics.jsonl: one JSON object per log row. On resume, rows after the resumed step are dropped (they belong
    to the part of the interrupted run that the checkpoint does not hold), so the file tells one consistent story."""

    def __init__(self, path: Path, write: bool, resume_step: int | None = None):
        self.path, self.write_enabled = path, write
        self.rows: list[dict] = []
        if resume_step is not None and path.exists():
            self.rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        if write:
            with atomic_file(path) as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.write_enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


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
