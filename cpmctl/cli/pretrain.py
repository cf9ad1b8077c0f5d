"""`cpmctl pretrain`: train a CPM-Ant model from scratch or continue a checkpoint on packed data."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cpmctl.cli.common import (
    DeviceMemory, EXIT_INTERRUPTED, PrintRecipe, RunForce, emit_json, emit_result, err, examples, out,
    recipe_keys, show_recipe
)

EXAMPLES = recipe_keys("pretrain/mini") + "\n\n" + examples(
    "cpmctl pretrain --recipe pretrain/mini",
    "cpmctl pretrain --recipe my.yaml train.lr=3e-3 train.logger=tensorboard",
    "cpmctl pretrain --resume runs/mini/pretrain", "cpmctl pretrain --recipe pretrain/mini --print-recipe")


def pretrain(
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: section.key=value (train.lr=1e-3)."),
    recipe_path: Path = typer.Option(None, "--recipe", help="Recipe YAML, or a built-in name (pretrain/mini; "
                                     "`cpmctl recipes list`)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in DIR (its out_dir or a step checkpoint)."),
    nproc: int = typer.Option(None, "--nproc", help="Run N processes on this machine (launches torchrun). With "
                              "--dry-run: plan for N ranks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-rank memory plan (parameters, gradients, "
                                 "AdamW, activations, start-up); read no weights, train nothing."),
    device_memory: DeviceMemory = None,
    force: RunForce = False,
    print_recipe: PrintRecipe = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the result."),
):
    """Pretrain or continue training; checkpoints, metrics.jsonl and loss_curve.png go to out_dir, the model to
    out_dir/final."""
    from cpmctl.train.launch import run_under_torchrun
    from cpmctl.train.loop import TrainingInterrupted
    from cpmctl.train.pretrain import preflight, resume_run_dir, run_pretrain
    from cpmctl.train.recipe import load_pretrain_recipe

    overrides = list(overrides or [])
    recipe = load_pretrain_recipe(recipe_path, overrides)
    if resume is not None:
        recipe.out_dir, recipe.resume = str(resume_run_dir(resume)), str(resume)
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    if dry_run:
        from cpmctl.train.memory_plan import TrainPlan, plan_lines
        from cpmctl.train.pretrain import plan_memory

        plan = plan_memory(recipe, nproc, device_memory)
        if json_out:
            emit_json(plan)
            return
        fields = {k: v for k, v in plan["plan"].items() if k not in ("needed_bytes", "fits")}
        for line in plan_lines([(f"pretrain {plan['model']}", TrainPlan(**fields))], plan["verdict"],
                               f"rows of {plan['seq_len']} tokens"):
            out.print(line, highlight=False)
        return
    if nproc is not None:
        preflight(recipe)
        args = (["--recipe", str(recipe_path)] if recipe_path else []) + overrides
        if recipe.train.engine == "single":
            err.print("--nproc: train.engine single -> ddp")
            args.append("train.engine=ddp")
        args += (["--resume", str(resume)] if resume is not None else []) + (["--json"] if json_out else [])
        args += ["--force"] if force else []
        return run_under_torchrun(nproc, "pretrain", args)

    rank = int(os.environ.get("RANK", 0))
    try:
        result = run_pretrain(recipe, log=err.print, force=force)
    except TrainingInterrupted as e:
        if rank == 0:
            where = f"; checkpoint {e.checkpoint}" if e.checkpoint else ""
            err.print(f"interrupted at step {e.step}{where}; continue with --resume {recipe.out_dir}")
            if json_out:
                emit_json({"interrupted": True, "steps": e.step, "checkpoint": str(e.checkpoint) if e.checkpoint else None,
                           "output": recipe.out_dir})
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if rank != 0:
        return
    if json_out:
        emit_result(result, result["out_dir"])
    else:
        valid = f", valid loss {result['valid_loss']:.4f}" if result["valid_loss"] is not None else ""
        train_loss = f"train loss {result['train_loss']:.4f}" if result["train_loss"] is not None else "nothing to do"
        speed = f", {result['tokens_per_s']:,.0f} tokens/s" if result["tokens_per_s"] else ""
        out.print(f"trained {result['steps']} steps: {train_loss}{valid}{speed} -> {result['final']}")
