"""Data bundled with cpmctl for the CPU demo (see README.md here): a small corpus and the lcsts-mini task."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(relative: str) -> Path:
    """Path of a bundled file, e.g. asset_path("corpus/batch1.jsonl")."""
    return ASSETS_DIR / relative
