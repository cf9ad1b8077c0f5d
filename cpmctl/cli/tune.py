"""`cpmctl tune lora|merge|import-delta`: LoRA delta tuning on a task, merging and importing adapters."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cpmctl.cli.common import (
    DeviceMemory, Force, PrintRecipe, RunForce, emit_json, emit_result, err, examples, format_count, out,
    recipe_keys, show_recipe
)
from cpmctl.tune.import_delta import OPENDELTA_DEFAULT_ALPHA

app = typer.Typer(help="LoRA delta tuning: train, merge and import adapters.", no_args_is_help=True)


@app.command(epilog=recipe_keys("tune/mini") + "\n\n" + examples(
    "cpmctl tune lora --task lcsts --model runs/mini/model --data cpmctl/assets/tasks/lcsts-mini --recipe tune/mini "
    "--out runs/lora", "cpmctl tune lora --task lcsts --model 10b --recipe tune/lcsts --dry-run",
    "cpmctl tune lora --task custom --task-def my-task.yaml --model ckpt/ --data my-task/ --out runs/t lora.r=16"))
def lora(
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: section.key=value (train.lr=1e-3)."),
    task: str = typer.Option(None, "--task", help="ccpm, c3, sogou-log, lcsts, kdconv, math23k, or custom."),
    task_def: Path = typer.Option(None, "--task-def", help="YAML task definition for --task custom."),
    template: str = typer.Option(None, "--template", help="Built-in tasks: original (CPM-Live's inputs, the default) "
                                 "or cpmctl (task.template; docs/tasks.md)."),
    model_path: str = typer.Option(None, "--model", help="Base checkpoint (any format); a ladder name for --dry-run."),
    data: Path = typer.Option(None, "--data", help="Task data: a directory with train.jsonl, dev.jsonl, test.jsonl."),
    recipe_path: Path = typer.Option(None, "--recipe", help="Recipe YAML, or a built-in name (tune/lcsts)."),
    out_dir: Path = typer.Option(None, "--out", help="Run directory: checkpoints, metrics.jsonl, best/ adapter."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    force: RunForce = False,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print trainable and total parameters and the per-rank "
                                 "memory plan; load no weights."),
    nproc: int = typer.Option(None, "--nproc", help="Run N processes on this machine (launches torchrun; "
                              "train.engine single becomes ddp). With --dry-run: plan for N ranks."),
    device_memory: DeviceMemory = None,
    print_recipe: PrintRecipe = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the result."),
):
    """Tune LoRA adapters on a task with the shared training loop; the best adapter on dev is kept in OUT/best."""
    from cpmctl.tune.recipe import load_tune_recipe
    from cpmctl.tune.tuning import tune_dry_run, tune_lora

    recipe = load_tune_recipe(recipe_path, overrides or [], task=task, task_def=task_def, template=template)
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    if dry_run:
        from cpmctl.train.memory_plan import TrainPlan, plan_lines

        counts = tune_dry_run(model_path, recipe, nproc, device_memory)
        if json_out:
            emit_json(counts)
        else:
            out.print(f"LoRA r {recipe.lora.r}, alpha {recipe.lora.alpha:g} on {', '.join(recipe.lora.targets)}: "
                      f"{counts['trainable']:,} trainable of {counts['total']:,} parameters "
                      f"({counts['trainable_percent']:.3f}%) in {counts['lora_modules']} modules")
            memory = counts["memory"]
            fields = {k: v for k, v in memory["plan"].items() if k not in ("needed_bytes", "fits")}
            for line in plan_lines([("tune lora", TrainPlan(**fields))], memory["verdict"],
                                   f"rows of {counts['seq_len']} tokens"):
                out.print(line, highlight=False)
        return
    if nproc is not None:
        from cpmctl.train.launch import run_under_torchrun

        given = {"--task": task, "--task-def": task_def, "--template": template, "--model": model_path, "--data": data,
                 "--recipe": recipe_path, "--out": out_dir, "--vocab": vocab}
        args = [a for flag, value in given.items() if value is not None for a in (flag, str(value))]
        args += list(overrides or [])
        if recipe.train.engine == "single":
            err.print("--nproc: train.engine single -> ddp")
            args.append("train.engine=ddp")
        args += [flag for flag, on in (("--resume", resume), ("--force", force), ("--json", json_out)) if on]
        return run_under_torchrun(nproc, "tune lora", args)
    result = tune_lora(model_path, data, out_dir, recipe, vocab=vocab, resume=resume, log=err.print, force=force)
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun rank 0 alone reports
    if json_out:
        emit_result(result, result["out"])
    else:
        best = result.get("best") or {}
        out.print(f"tuned {result['task']} for {result['steps']} steps ({result['epochs']} epochs"
                  f"{', stopped early' if result['stopped_early'] else ''}); best dev {result['metric']} "
                  f"{best.get('score', float('nan')):.3f} at epoch {best.get('epoch')} -> {result['adapter']}")


@app.command(epilog=examples("cpmctl tune merge --model runs/mini/model --adapter runs/lora/best --out runs/merged"))
def merge(
    model_path: Path = typer.Option(..., "--model", help="Base checkpoint (any format)."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory (peft format)."),
    out_dir: Path = typer.Option(..., "--out", help="Output checkpoint directory (native format)."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file to store (default: the one beside the model)."),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Merge an adapter into the base weights and write a native checkpoint (same outputs, no adapter needed)."""
    from cpmctl.model.lora import merge_adapter

    result = merge_adapter(model_path, adapter, out_dir, vocab=vocab, force=force)
    if json_out:
        emit_result(result, out_dir)
    else:
        out.print(f"merged {adapter} into {model_path} -> {out_dir}")


@app.command("import-delta", epilog=examples("cpmctl tune import-delta lcsts-delta.pt --model 10b --out lcsts-adapter/"))
def import_delta(
    path: Path = typer.Argument(..., help="OpenDelta / CPM-Live LoRA delta checkpoint (.pt state dict)."),
    out_dir: Path = typer.Option(None, "--out", help="Adapter directory to write (default: FILE's stem + '-adapter')."),
    model_path: str = typer.Option(None, "--model",
                                   help="Base checkpoint, config JSON or ladder name: checks and records the shape."),
    alpha: float = typer.Option(None, "--alpha", help="LoRA alpha the delta was trained with (default: OpenDelta's "
                                f"{OPENDELTA_DEFAULT_ALPHA:g})."),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Convert an original OpenDelta LoRA delta (lora_A / lora_B on project_q / project_v) into a peft adapter."""
    from cpmctl.tune.import_delta import import_delta as run_import
    from cpmctl.model.lora import base_config

    out_dir = out_dir or path.with_name(path.stem + "-adapter")
    config = base_config(model_path) if model_path else None
    given = {"alpha": alpha} if alpha is not None else {}
    result = run_import(path, out_dir, base_config=config, base_model=model_path, force=force, **given)
    if json_out:
        emit_result(result, out_dir)
    else:
        out.print(f"imported {result['modules']} LoRA modules (r {result['r']}, alpha {result['alpha']:g}, "
                  f"{format_count(result['parameters'])} parameters) from {path} -> {out_dir}")
        if result["ignored_keys"]:
            err.print(f"ignored {result['ignored_keys']} non-LoRA keys in {path}")
