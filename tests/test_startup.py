"""Fast start-up: `cpmctl --help`, `recipes list` and `data tokenize` import no torch, transformers or peft (each
checked in a fresh interpreter); the top-level listing names commands that exist; flags show as flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

HEAVY = ("torch", "transformers", "peft")
PROBE = """
import json, sys
from cpmctl.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %s if m in sys.modules]}), file=sys.stderr)
"""


def _imports(*argv, stdin: str | None = None, watch: tuple[str, ...] = HEAVY) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE % (watch,), *map(str, argv)], input=stdin,
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["recipes", "list"], ["pretrain", "--help"], ["data", "--help"]])
def test_light_commands_import_no_torch(argv):
    assert _imports(*argv) == {"code": 0, "heavy": []}


def test_data_tokenize_imports_no_torch(tiny_vocab):
    assert _imports("data", "tokenize", "-", "--vocab", tiny_vocab, stdin="今天天气不错\n") == {"code": 0, "heavy": []}


def test_the_probe_sees_what_a_command_imports():
    """The probe can fail: watching a module the command does import (rich's tables; not torch, whose import
    alone takes seconds here) it reports it, and not one it does not."""
    assert _imports("recipes", "list", watch=("rich.table", "sqlite3")) == {"code": 0, "heavy": ["rich.table"]}


def test_every_listed_command_loads_with_its_short_help():
    import click

    from cpmctl.cli.app import COMMANDS, app
    import typer

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    names = group.list_commands(ctx)
    assert {"data", "pretrain", "prune", "tune", "eval", "generate", "model", "run", "recipes"} <= set(names)
    for name in names:
        command = group.get_command(ctx, name)
        assert command is not None and command.short_help == COMMANDS[name][2], name
    assert group.get_command(ctx, "nope") is None


def test_stdin_text_loses_its_final_newline(capsys, tiny_vocab, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("今天\n"))
    code, out, err = run_cli(capsys, "data", "tokenize", "-", "--vocab", tiny_vocab, "--json")
    assert code == 0, err
    assert json.loads(out)["text"] == "今天"


def test_flags_show_as_flags(capsys):
    code, out, _ = run_cli(capsys, "model", "init", "--help")
    assert code == 0 and "--json" in out and "--force" in out
    assert "<bool>" not in out and "<int>" in out  # a valued option keeps its type
    code, out, _ = run_cli(capsys, "recipes", "show", "--help")
    assert "Examples" in out and "$ cpmctl recipes show pretrain/mini" in out
