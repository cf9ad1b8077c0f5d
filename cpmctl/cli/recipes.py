"""`cpmctl recipes list|show|copy`: the built-in recipes (recipes/ in the repository, cpmctl/recipes in a wheel).

`list` reads only the files (no model code is imported); `show` loads the recipe through its stage's schema and
prints every key with its type, default and meaning, read from the recipe dataclasses (cpmctl/recipe.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from cpmctl import CpmctlError
from cpmctl.cli.common import Force, JsonFlag, emit_json, examples, out
from cpmctl.resources import builtin_recipes, require_builtin_recipe

app = typer.Typer(help="List, show and copy the built-in recipes.", no_args_is_help=True)

# The schema of each kind of recipe: the directory of recipes/ it lives in -> module:class.
SCHEMAS = {
    "data": "cpmctl.data.recipe:FilterRecipe",
    "eval": "cpmctl.evaluate.recipe:EvalRecipe",
    "lifecycle": "cpmctl.lifecycle.recipe:LifecycleRecipe",
    "pretrain": "cpmctl.train.recipe:PretrainRecipe",
    "prune": "cpmctl.prune.recipe:PruneRecipe",
    "tune": "cpmctl.tune.recipe:TuneRecipe",
}
COMMANDS = {"data": "cpmctl data filter --recipe", "eval": "cpmctl eval --recipe", "lifecycle": "cpmctl run",
            "pretrain": "cpmctl pretrain --recipe", "prune": "cpmctl prune --recipe",
            "tune": "cpmctl tune lora --recipe"}


def schema(kind: str):
    """The recipe dataclass of a kind (`pretrain` -> PretrainRecipe)."""
    if kind not in SCHEMAS:
        raise CpmctlError(f"unknown recipe kind '{kind}' (known: {', '.join(SCHEMAS)})")
    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def summary(path: Path) -> str:
    """The first line of the recipe file's leading comment, without a closing "Run it with:" clause."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            head, _, last = text.rpartition(". ")
            return (head + "." if head and last.endswith(":") else text).rstrip(":")
    return ""


@app.command("list", epilog=examples("cpmctl recipes list", "cpmctl recipes list --json"))
def list_(json_out: JsonFlag = False):
    """The built-in recipes: NAME (use it as --recipe NAME), the command it is for, and what it does."""
    rows = [{"name": name, "kind": name.split("/")[0], "command": COMMANDS.get(name.split("/")[0], ""),
             "path": str(path), "summary": summary(path)} for name, path in builtin_recipes().items()]
    if json_out:
        for row in rows:
            emit_json(row)
        return
    from rich.table import Table

    table = Table(title=f"built-in recipes ({len(rows)}): --recipe NAME, `cpmctl recipes show NAME`",
                  title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("summary")
    for row in rows:
        table.add_row(row["name"], row["summary"])
    out.print(table)


@app.command(epilog=examples("cpmctl recipes show pretrain/mini", "cpmctl recipes show tune    # the defaults of every key",
                             "cpmctl recipes show my.yaml --kind prune",
                             "cpmctl recipes show pretrain/mini train.lr=3e-3"))
def show(
    name: str = typer.Argument(..., help="A built-in recipe (pretrain/mini), a kind for its defaults "
                               f"({', '.join(SCHEMAS)}), or a recipe file with --kind."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides to apply first."),
    kind: str = typer.Option(None, "--kind", help=f"The schema of a recipe file: {', '.join(SCHEMAS)}."),
    json_out: JsonFlag = False,
):
    """Print the resolved recipe as YAML, every key with its type, default and meaning; the output is a recipe."""
    from cpmctl.recipe import apply_overrides, describe_recipe, from_dict, load_recipe_file, to_dict

    path, kind = _locate(name, kind)
    # Types and choices are checked; the rules a command checks before it runs (a required input) are not, so a
    # kind's defaults and an incomplete recipe can be shown.
    data = load_recipe_file(path) if path is not None else {}
    recipe = from_dict(schema(kind), apply_overrides(data, list(overrides or [])))
    if json_out:
        emit_json({"name": name, "kind": kind, "path": None if path is None else str(path), "recipe": to_dict(recipe)})
        return
    head = f"# {name}" + (f" ({path})" if path is not None and str(path) != name else "")
    out.print("\n".join([head, f"# key: value  # type; default; meaning. Use: {COMMANDS[kind]} ...", "",
                         *describe_recipe(recipe)]), markup=False, highlight=False)


def _locate(name: str, kind: str | None) -> tuple[Path | None, str]:
    """(the recipe file or None for a kind's defaults, its kind)."""
    if name in SCHEMAS and kind is None:
        return None, name
    if Path(name).is_file():
        kind = kind or Path(name).resolve().parent.name
        if kind not in SCHEMAS:
            raise CpmctlError(f"{name}: which kind of recipe is it? pass --kind ({', '.join(SCHEMAS)})")
        return Path(name), kind
    path = require_builtin_recipe(name)
    return path, kind or path.parent.name


@app.command(epilog=examples("cpmctl recipes copy pretrain/mini my-pretrain.yaml",
                             "cpmctl recipes copy tune/lcsts my-recipes/    # into a directory"))
def copy(
    name: str = typer.Argument(..., help="A built-in recipe (`cpmctl recipes list`)."),
    dest: Path = typer.Argument(..., help="The file to write, or an existing directory to copy into."),
    force: Force = False,
    json_out: JsonFlag = False,
):
    """Copy a built-in recipe to edit it; an existing file is not overwritten (--force replaces it)."""
    from cpmctl.outputs import claim

    source = require_builtin_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    output = claim(target, "recipes copy", kind="file", force=force, inputs=[source], what="DEST")
    with output.file(encoding="utf-8") as f:
        f.write(source.read_text(encoding="utf-8"))
    if json_out:
        emit_json({"name": name, "source": str(source), "output": str(target)})
    else:
        out.print(f"copied {name} -> {target}")
