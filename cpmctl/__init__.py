"""cpmctl: the CPM-Ant lifecycle toolchain (data, pretrain, prune, tune, eval, generate)."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root: configs/ and recipes/ live beside the package (the install is editable).
REPO_ROOT = Path(__file__).resolve().parent.parent


class CpmctlError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
