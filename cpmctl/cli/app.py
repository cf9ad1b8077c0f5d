"""The `cpmctl` command: one Typer app, one module per command group. Each command parses its arguments, calls
one function of the core library and renders the result (rich, or one JSON object per result with --json)."""

from __future__ import annotations

import sys
import warnings

import click
import typer
from rich.markup import escape

from cpmctl import CpmctlError, __version__
from cpmctl.cli import common

try:  # typer >= 0.2x vendors click: its usage errors are not click's classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:
    _TyperClickException = click.ClickException

app = typer.Typer(
    name="cpmctl",
    help="Train, compress, tune and serve CPM-Ant-family Chinese language models.",
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


def _register() -> None:
    # Command groups register themselves here as they are built; a group that is not built is simply absent.
    from cpmctl.cli import data, generate, model

    app.add_typer(model.app, name="model")
    app.add_typer(data.app, name="data")
    app.command("generate")(generate.generate)
    from cpmctl.cli import pretrain

    app.command("pretrain")(pretrain.pretrain)
    from cpmctl.cli import tune

    app.add_typer(tune.app, name="tune")
    from cpmctl.cli import eval as eval_cli

    app.add_typer(eval_cli.app, name="eval")
    from cpmctl.cli import prune

    app.command("prune")(prune.prune)
    from cpmctl.cli import run

    app.command("run")(run.run)


_register()


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
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
    import torch

    return torch.OutOfMemoryError
