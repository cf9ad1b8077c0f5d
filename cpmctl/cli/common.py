"""Shared CLI plumbing: consoles, --json output, exit codes, small renderers."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from rich.console import Console

from cpmctl import CpmctlError
from cpmctl.outputs import FORCE_HELP
from cpmctl.progress import stderr

# Human output on stdout; progress bars and warnings on stderr so `--json` stdout stays machine-readable.
out = Console(highlight=False, soft_wrap=True)
err = stderr

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# errno -> what the user reads; anything else from the OS is a bug and keeps its traceback.
_ENVIRONMENT = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "is a directory where a file is expected",
                errno.ENOTDIR: "not a directory", errno.ENAMETOOLONG: "file name too long",
                errno.ELOOP: "too many levels of symbolic links", errno.EMFILE: "too many open files",
                errno.EIO: "input/output error"}
_TEMP = re.compile(r"^\.(.+)\.\d+\.[^.]+(?:\.spool)?\.tmp$")  # io.make_temp's names: report the output instead


def environment_error(e: OSError) -> str | None:
    """One line for an OSError the environment caused (the file named as the user named it), else None."""
    reason = _ENVIRONMENT.get(e.errno)
    if reason is None:
        return None
    where = e.filename
    if where is not None:
        path = Path(os.fsdecode(where))
        m = _TEMP.match(path.name)
        where = str(path.with_name(m.group(1))) if m else str(path)
    return f"{where}: {reason}" if where else f"{reason} ({e.strerror})"


def show_recipe(recipe, json_out: bool = False) -> None:
    """`--print-recipe`: the resolved recipe as YAML, or as one JSON object with --json."""
    from cpmctl.recipe import dump_recipe, to_dict

    if json_out:
        emit_json(to_dict(recipe))
    else:
        out.print(dump_recipe(recipe), end="", markup=False)


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


# Options that several commands share, declared once (`force: Force = False`).
Force = Annotated[bool, typer.Option("--force", help=FORCE_HELP)]
RunForce = Annotated[bool, typer.Option("--force", help="Start anew even though the output directory holds something "
                                        "else or an earlier run; it is replaced only once the new run is complete.")]
PrintRecipe = Annotated[bool, typer.Option("--print-recipe", help="Print the resolved recipe and exit.")]
DeviceMemory = Annotated[float, typer.Option("--device-memory", help="With --dry-run: GB per device to check the "
                                             "per-rank memory plan against (fits / the smallest process count).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object per result on stdout.")]

def emit_result(obj: dict, output) -> None:
    """A command's JSON result, naming what it wrote `output`: the one spelling in every command's result
    (docs/cli.md). The core's older names for it (`out`, `out_dir`) stay beside it as aliases."""
    emit_json({**obj, "output": str(output)})


def examples(*lines: str) -> str:
    """A command's epilog: an Examples section, one command per line (escaped, so `[a, b]` in a command is not
    read as rich markup)."""
    from rich.markup import escape

    return "\n".join(["[bold]Examples[/bold]", *(escape(f"$ {line}") for line in lines)])


def DefaultsFrom(spec: str) -> type:
    """A command class whose option help names defaults as `{field}`, filled in from the dataclass at
    "module:Class" only when the help is shown: the command's module does not import the core module that holds
    them (and torch behind it) to start. The dataclass stays the one place the defaults are written."""
    from typer.core import TyperCommand

    class Command(TyperCommand):
        def format_help(self, ctx, formatter):
            import dataclasses
            import importlib

            module, name = spec.split(":")
            defaults = dataclasses.asdict(getattr(importlib.import_module(module), name)())
            for param in self.params:
                if param.help and "{" in param.help:
                    param.help = param.help.format_map(defaults)
            super().format_help(ctx, formatter)

    return Command


def recipe_keys(name: str) -> str:
    """The line naming where a command's recipe keys are listed, for its --help."""
    return f"Recipe keys, their types, defaults and meaning: cpmctl recipes show {name}"
