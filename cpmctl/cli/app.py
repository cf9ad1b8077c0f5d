"""The `cpmctl` command: one Typer app, one module per command group. Each command parses its arguments, calls
one function of the core library and renders the result (rich, or one JSON object per result with --json).

Start-up stays fast: a command's module is imported only when that command runs (or shows its help), so
`cpmctl --help`, `cpmctl recipes list` and `cpmctl data tokenize` never import torch (tests/test_startup.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

import click
import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

from cpmctl import CpmctlError, __version__
from cpmctl.cli import common

try:  # typer >= 0.2x vendors click: its usage errors are not click's classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:
    _TyperClickException = click.ClickException

# name -> (module, attribute: a Typer group or a command function, the line the top-level listing shows). A
# command function's module may define its --help epilog as NAME_EXAMPLES (SERVE_EXAMPLES) or EXAMPLES. A module
# that is not there (yet) is left out.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("cpmctl.cli.data", "app", "Tokenize, filter, deduplicate, build vocabularies and pack training data."),
    "pretrain": ("cpmctl.cli.pretrain", "pretrain", "Pretrain a model from scratch or continue a checkpoint."),
    "prune": ("cpmctl.cli.prune", "prune", "Structured pruning down the size ladder: masks, extraction, recovery."),
    "tune": ("cpmctl.cli.tune", "app", "LoRA delta tuning: train, merge and import adapters."),
    "eval": ("cpmctl.cli.eval", "app", "Evaluate models: task metrics, perplexity, and size-ladder comparisons."),
    "generate": ("cpmctl.cli.generate", "generate", "Generate text from a prompt or a JSONL file of prompts."),
    "model": ("cpmctl.cli.model", "app", "Create, inspect and convert CPM-Ant checkpoints."),
    "run": ("cpmctl.cli.run", "run", "Run a lifecycle recipe: data -> pretrain -> prune -> tune -> eval -> generate."),
    "recipes": ("cpmctl.cli.recipes", "app", "List, show and copy the built-in recipes."),
    "serve": ("cpmctl.cli.serve", "serve", "Serve a model over OpenAI-compatible HTTP."),
    "chat": ("cpmctl.cli.serve", "chat", "Chat with a model in the terminal."),
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


class LazyGroup(TyperGroup):
    """The root group: lists COMMANDS from their static lines and imports a command's module only to run it (or
    to show its own help)."""

    listing = False  # True while the root's help is rendered: commands are shown, not loaded

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _, _) in COMMANDS.items() if _present(module)]

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS or not _present(COMMANDS[name][0]):
            return None
        module_name, attr, short = COMMANDS[name]
        if self.listing:
            return TyperCommand(name=name, help=short)
        module = importlib.import_module(module_name)
        target = getattr(module, attr)
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)
        else:
            single = typer.Typer(add_completion=False)
            epilog = getattr(module, f"{attr.upper()}_EXAMPLES", None) or getattr(module, "EXAMPLES", None)
            single.command(name, epilog=epilog)(target)
            command = typer.main.get_command(single)
        command.name, command.short_help = name, short
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


def _display_type(self, ctx):
    """A flag (`--json`, `--force`, `--help`) takes no value, so its help shows no `<bool>` type (typer 0.2x
    prints one)."""
    return None if self.is_flag else _typer_display_type(self, ctx)


_typer_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _display_type

app = typer.Typer(
    cls=LazyGroup,
    name="cpmctl",
    help="Train, compress, tune and serve CPM-Ant-family Chinese language models.",
    epilog=common.examples("cpmctl recipes list", "cpmctl data tokenize '今天天气很好' --vocab vocab.txt",
                           "cpmctl run lifecycle/mini", "cpmctl COMMAND --help"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"cpmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


_PACKAGE = Path(__file__).resolve().parent.parent
_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """cpmctl's own warnings as one plain line (`warning: ...`), not Python's location and source line."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        common.err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", markup=True, highlight=False,
                         soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    warnings.showwarning = _show_warning
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = app(args=args, standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else common.EXIT_OK)
    except CpmctlError as e:
        _fail(str(e), e.exit_code, args)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.ClickException, _TyperClickException) as e:
        if "--json" in args:
            common.emit_json({"error": e.format_message(), "exit_code": e.exit_code})
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        common.err.print("interrupted")
        sys.exit(common.EXIT_INTERRUPTED)
    except FileNotFoundError as e:
        _fail(f"file not found: {e.filename}", common.EXIT_BAD_INPUT, args)
    except OSError as e:  # the environment's faults (read-only, full, a directory for a file): one line, exit 2
        message = common.environment_error(e)
        if message is None:
            raise
        _fail(message, common.EXIT_BAD_INPUT, args)
    except UnicodeDecodeError as e:
        _fail(f"an input is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8",
              common.EXIT_BAD_INPUT, args)
    except torch_oom() as e:
        _fail(f"out of memory ({str(e).splitlines()[0][:120]}); lower the batch size", common.EXIT_FAILURE, args)


def _fail(message: str, code: int, args: list[str]) -> None:
    """One `error:` line on stderr; with --json also one JSON object on stdout, so a script that parses stdout
    sees the failure too."""
    common.err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    if "--json" in args:
        common.emit_json({"error": message, "exit_code": code})
    sys.exit(code)


def torch_oom():
    """torch's out-of-memory error, without importing torch for it: if torch was never imported, no error is
    torch's (an `except ()` matches nothing)."""
    torch = sys.modules.get("torch")
    return torch.OutOfMemoryError if torch is not None else ()
