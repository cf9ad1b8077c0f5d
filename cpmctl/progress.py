"""Progress on stderr, shared by the CLI and the core: the rich console that bars and warnings go to (stdout stays
free for results and `--json`), and the bars themselves (training steps, bytes read, items scored)."""

from __future__ import annotations

import contextlib

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


class StepProgress:
    """Training steps: step, loss, tokens/s and ETA; a no-op when disabled (another rank, or asked not to)."""

    def __init__(self, total: int, done: int, enabled: bool, label: str = "train"):
        self.enabled = enabled
        if enabled:
            self.progress = Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(), console=stderr, transient=False)
            self.task = self.progress.add_task(label, total=total, completed=done, loss="-", tps="-")

    def advance(self, loss: float, tokens_per_s: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False


def count_bar(label: str) -> Progress:
    """Items done of a known total (examples scored, documents read), with rate and ETA."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} /s"),
                    TimeRemainingColumn(), console=stderr, transient=True)


@contextlib.contextmanager
def byte_bar(total: int | None, label: str):
    """Input bytes read (total None: compressed inputs, size unknown); yields `advance(n)`. Shown on terminals only."""
    columns = [TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
