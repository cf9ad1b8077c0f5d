"""cpmctl: the CPM-Ant lifecycle toolchain (data, pretrain, prune, tune, eval, generate)."""

__version__ = "0.1.0"

# The files that ship with cpmctl (configs/, recipes/, assets/) are found by cpmctl/resources.py, in a wheel or a
# checkout alike.


class CpmctlError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
