"""Progress on stderr, shared by the CLI and the core: the rich console that bars and warnings go to (stdout stays
free for results and `--json`), and the bars themselves (training steps, bytes read, items scored).

On a terminal the bars redraw in place. When stderr is not a terminal (Slurm, nohup, a pipe) a redrawn bar prints
nothing useful, so every bar prints a plain, timestamped line instead, at a steady interval: every `log_every`
steps or every CPMCTL_LOG_INTERVAL seconds (default 30), whichever comes first, and once at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

LOG_INTERVAL_ENV = "CPMCTL_LOG_INTERVAL"  # seconds between plain progress lines (default 30)
DEFAULT_LOG_INTERVAL = 30.0


def log_interval() -> float:
    value = os.environ.get(LOG_INTERVAL_ENV)
    if not value:
        return DEFAULT_LOG_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        from cpmctl import CpmctlError

        raise CpmctlError(f"{LOG_INTERVAL_ENV}={value!r}: expected a number of seconds") from None
    return max(seconds, 0.0)


def plain_logs() -> bool:
    """True when stderr is not a terminal: plain progress lines instead of bars."""
    return not stderr.is_terminal


def timestamp() -> str:
    """Wall-clock time with the UTC offset, to the second (the form of every log line and metrics row)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainLine:
    """Timestamped progress lines for a log file: `due()` says when the next one is owed."""

    def __init__(self, label: str, total: float | None, done: float = 0.0, every: int | None = None):
        self.label, self.total, self.every = label, total, every
        self.interval = log_interval()
        self.started = self.last = time.monotonic()
        self.start_done = done

    def due(self, done: float) -> bool:
        if self.total is not None and done >= self.total:
            return True
        if self.every and int(done) % self.every == 0:
            return True
        return time.monotonic() - self.last >= self.interval

    def emit(self, done: float, fields: str = "", unit: str = "") -> None:
        now = time.monotonic()
        self.last = now
        elapsed = now - self.started
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if self.total is not None and rate > 0 else None
        count = f"{_count(done)}/{_count(self.total)}" if self.total is not None else _count(done)
        parts = [timestamp(), self.label, f"{count}{unit}", fields, f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        print("  ".join(p for p in parts if p), file=sys.stderr, flush=True)


def _count(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


class StepProgress:
    """Training steps: step, loss, lr, tokens/s and ETA; a no-op when disabled (another rank, or asked not to).
    A bar on a terminal, plain lines otherwise (every `log_every` steps or the log interval)."""

    def __init__(self, total: int, done: int, enabled: bool, label: str = "train", log_every: int | None = None):
        self.enabled, self.done = enabled, done
        self.plain = PlainLine(label, total, done, log_every) if enabled and plain_logs() else None
        if enabled and self.plain is None:
            self.progress = Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(), console=stderr, transient=False)
            self.task = self.progress.add_task(label, total=total, completed=done, loss="-", tps="-")

    def advance(self, loss: float, tokens_per_s: float, lr: float | None = None) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.plain is not None:
            if self.plain.due(self.done):
                fields = [f"loss {loss:.4f}"] + ([f"lr {lr:.3e}"] if lr is not None else [])
                self.plain.emit(self.done, "  ".join(fields + [f"{tokens_per_s:,.0f} tok/s"]), unit=" steps")
            return
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def __enter__(self):
        if self.enabled and self.plain is None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled and self.plain is None:
            self.progress.stop()
        return False


class _PlainAwareProgress(Progress):
    """A rich Progress that, when stderr is not a terminal, prints a timestamped line per task at the log interval
    (rich draws nothing there until the end)."""

    def __init__(self, *columns, label: str, unit: str = "", **kw):
        super().__init__(*columns, **kw)
        self._label, self._unit, self._lines = label, unit, {}

    def update(self, task_id, **kw) -> None:
        super().update(task_id, **kw)
        self._maybe_log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id) -> None:
        if not plain_logs():
            return
        task = self._tasks[task_id]
        line = self._lines.get(task_id)
        if line is None:
            name = self._label if task.description in ("", self._label) else f"{self._label} {task.description}"
            line = self._lines[task_id] = PlainLine(name, task.total, 0.0)
        line.total = task.total
        if line.due(task.completed):
            line.emit(task.completed, unit=self._unit)


def count_bar(label: str) -> Progress:
    """Items done of a known total (examples scored, documents read), with rate and ETA."""
    return _PlainAwareProgress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} /s"),
                               TimeRemainingColumn(), console=stderr, transient=True, label=label)


@contextlib.contextmanager
def byte_bar(total: int | None, label: str):
    """Input bytes read (total None: compressed inputs, size unknown); yields `advance(n)`. A bar on terminals,
    timestamped lines in bytes otherwise."""
    columns = [TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with _PlainAwareProgress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal, label=label,
                             unit=" bytes") as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
