"""Shared CLI plumbing: consoles, --json output, exit codes, small renderers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from cpmctl import CpmctlError
from cpmctl.progress import stderr

# Human output on stdout; progress bars and warnings on stderr so `--json` stdout stays machine-readable.
out = Console(highlight=False, soft_wrap=True)
err = stderr

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

def emit_json(obj) -> None:
    """One JSON object per line on stdout."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise CpmctlError(f"{what} not found: {path}")
    return path


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}"
    return str(n)
