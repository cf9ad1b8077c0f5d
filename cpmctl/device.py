"""Device and dtype policy, in one place: what `--device auto` means, which dtypes a device can run, and the
one-line errors for a choice the machine cannot honour. Used by the CLI and by core stages (the perplexity
filter, training engines) alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpmctl import CpmctlError

if TYPE_CHECKING:
    import torch

# The names only: recipes validate them without importing torch (data commands start without it).
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_device(name: str, local_rank: int = 0, what: str = "--device") -> torch.device:
    """auto -> cuda when available, else cpu; a bare `cuda` on a distributed rank is its own local GPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CpmctlError(f"{what} {name}: no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise CpmctlError(f"{what} must be cpu, cuda[:N] or auto, got '{name}'")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device, what: str = "--dtype") -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise CpmctlError(f"{what} must be one of {', '.join(DTYPE_NAMES)}, got '{name}'")
    if name == "fp16" and device.type == "cpu":
        raise CpmctlError(f"{what} fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return torch_dtype(name)
