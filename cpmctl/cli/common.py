"""Shared CLI plumbing: consoles, --json output, device/dtype choice, error rendering."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from cpmctl import CpmctlError

# Human output on stdout; progress bars and warnings on stderr so `--json` stdout stays machine-readable.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def emit_json(obj) -> None:
    """One JSON object per line on stdout."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CpmctlError(f"--device {name}: no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise CpmctlError(f"--device must be cpu, cuda or auto, got '{name}'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise CpmctlError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    if name == "fp16" and device.type == "cpu":
        raise CpmctlError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return DTYPES[name]


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise CpmctlError(f"{what} not found: {path}")
    return path


def vocab_for(checkpoint_vocab: Path | None, given: str | Path | None, checkpoint: str | Path) -> Path:
    if given is not None:
        return require_file(given, "vocab file")
    if checkpoint_vocab is not None:
        return checkpoint_vocab
    raise CpmctlError(f"{checkpoint}: no vocab.txt beside the checkpoint; pass --vocab FILE")


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}"
    return str(n)
