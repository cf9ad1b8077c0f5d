"""`cpmctl run RECIPE`: data -> pretrain -> prune -> tune -> eval -> generate, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from cpmctl.cli.common import PrintRecipe, RunForce, emit_json, emit_result, err, examples, out, recipe_keys, show_recipe

EXAMPLES = recipe_keys("lifecycle/mini") + "\n\n" + examples(
    "cpmctl run lifecycle/mini", "cpmctl run lifecycle/mini run_dir=runs/x data.input=[my.jsonl]",
    "cpmctl run recipes/lifecycle/mini.yaml --from-stage pretrain", "cpmctl run lifecycle/mini --only eval --json")


def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Lifecycle recipe YAML, or a built-in name "
                                       "(lifecycle/mini)."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Recipe overrides, e.g. run_dir=runs/x."),
    from_stage: str = typer.Option(None, "--from-stage", help="Rerun from this stage on (earlier ones must be done)."),
    only: str = typer.Option(None, "--only", help="Run only this stage."),
    force: RunForce = False,
    print_recipe: PrintRecipe = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per stage and one for the report."),
):
    """Run the recipe's stages in order (finished stages are skipped) and write report.md into the run directory."""
    from cpmctl.lifecycle.recipe import LifecycleRecipe
    from cpmctl.lifecycle.report import write_report
    from cpmctl.lifecycle.runner import run_lifecycle
    from cpmctl.lifecycle.stages import STAGES
    from cpmctl.recipe import load_recipe

    recipe = load_recipe(LifecycleRecipe, recipe_path, overrides or [])
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    echo = (lambda s: err.print(s, markup=False)) if json_out else (lambda s: out.print(s, markup=False))
    state = run_lifecycle(recipe, STAGES, from_stage=from_stage, only=only, echo=echo, force=force)
    report = write_report(state)
    if json_out:
        for name in recipe.stages:
            rec = state.state["stages"].get(name)
            if rec:
                emit_json({"stage": name, "seconds": rec["seconds"], "outputs": rec["outputs"]})
        emit_result({"report": str(report), "run_dir": str(state.dir)}, state.dir)
    else:
        out.print(f"report: {report}")
