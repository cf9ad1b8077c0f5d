"""`cpmctl prune`: progressive structured pruning down the size ladder (learned masks, extraction, recovery)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from cpmctl.cli.common import (
    DeviceMemory, EXIT_INTERRUPTED, PrintRecipe, RunForce, emit_json, err, examples, format_count, out,
    recipe_keys, show_recipe
)

EXAMPLES = recipe_keys("prune/mini") + "\n\n" + examples(
    "cpmctl prune --model runs/pretrain/final --from mini-10b --to mini-300m --data packed/train --recipe prune/mini "
    "--out runs/prune", "cpmctl prune --model 10b.pt --from 10b --to 7b --dry-run",
    "cpmctl prune --recipe prune/10b-7b recovery.steps=500 --print-recipe")


def prune(
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: section.key=value (recovery.steps=500)."),
    model: Path = typer.Option(None, "--model", help="Checkpoint of the --from stage (native dir, original .pt, HF)."),
    source: str = typer.Option(None, "--from", help="Ladder name (10b, mini-10b, ...) or config JSON of the model."),
    target: str = typer.Option(None, "--to", help="Ladder name or config JSON to prune to (every rung in between)."),
    data: Path = typer.Option(None, "--data", help="Packed training data (`cpmctl data pack`); sets data.train."),
    valid: Path = typer.Option(None, "--valid", help="Packed validation data (default: hold out rows of --data)."),
    recipe_path: Path = typer.Option(None, "--recipe", help="Recipe YAML, or a built-in name (prune/mini)."),
    out_dir: Path = typer.Option(None, "--out", help="Output directory: one sub-directory per stage."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file to store with the outputs (default: beside --model)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages, target shapes and parameter counts."),
    nproc: int = typer.Option(None, "--nproc", help="Run N processes on this machine (launches torchrun; "
                              "mask.engine / recovery.engine single -> ddp). With --dry-run: plan for N ranks."),
    device_memory: DeviceMemory = None,
    force: RunForce = False,
    print_recipe: PrintRecipe = False,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per stage (with --dry-run: the plan)."),
):
    """Prune --model from --from to --to: per stage, masks trained under the LM loss, exact extraction to the target
    shape, recovery training; outputs in native and original formats. Rerun the same command to resume."""
    from cpmctl.prune.pipeline import prepare, run_prune
    from cpmctl.prune.recipe import load_prune_recipe
    from cpmctl.train.loop import TrainingInterrupted

    overrides = list(overrides or [])
    if data is not None:
        overrides.append(f"data.train={data}")
    if valid is not None:
        overrides.append(f"data.valid={valid}")
    recipe = load_prune_recipe(recipe_path, overrides)
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    plan = prepare(source, target, model, out_dir, vocab)
    if dry_run:
        summary = plan.summary()
        summary["memory"] = plan.memory(recipe, nproc, device_memory)
        _render_plan(summary, json_out)
        return
    plan.check_runnable()
    if nproc is not None:
        return _launch(nproc, recipe, overrides, model=model, source=source, target=target, recipe_path=recipe_path,
                       out_dir=out_dir, vocab=vocab, force=force, json_out=json_out)
    rank = int(os.environ.get("RANK", 0))
    if not json_out and rank == 0:
        err.print(f"pruning {model}: {' -> '.join([plan.stages[0].source_name] + [s.target_name for s in plan.stages])}"
                  f" ({recipe.method} selection) -> {out_dir}")
    try:
        run_prune(plan, recipe, log=err.print, on_stage=lambda r: _render_stage(r, json_out), force=force)
    except TrainingInterrupted as e:
        if rank != 0:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        where = f" (checkpoint {e.checkpoint})" if e.checkpoint else ""
        err.print(f"interrupted at step {e.step}{where}; rerun the same command to resume")
        if json_out:
            emit_json({"interrupted": True, "steps": e.step, "checkpoint": str(e.checkpoint) if e.checkpoint else None,
                       "output": str(out_dir)})
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _launch(nproc: int, recipe, overrides: list[str], *, model, source, target, recipe_path, out_dir, vocab, force,
            json_out) -> int:
    """The same command in `nproc` processes under torchrun; phases with engine single run as ddp."""
    from cpmctl.train.launch import run_under_torchrun

    args = ["--model", str(model), "--from", str(source), "--to", str(target), "--out", str(out_dir)]
    args += (["--recipe", str(recipe_path)] if recipe_path else []) + (["--vocab", str(vocab)] if vocab else [])
    args += list(overrides)
    for name in ("mask", "recovery"):
        if getattr(recipe, name).engine == "single":
            err.print(f"--nproc: {name}.engine single -> ddp")
            args.append(f"{name}.engine=ddp")
    args += (["--json"] if json_out else []) + (["--force"] if force else [])
    return run_under_torchrun(nproc, "prune", args)


_SHORT = {"attention": "attn", "ffn": "ffn", "heads": "heads", "channels": "ff"}


def _render_plan(summary: dict, json_out: bool) -> None:
    if json_out:
        emit_json(summary)
        return
    rows = summary["stages"]
    table = Table(title=f"prune {summary['from']} -> {summary['to']}")
    for col in ("stage", "prunes", "attn kept", "ffn kept", "heads", "dim_ff", "non-emb params", "kept"):
        table.add_column(col)
    for r in rows:
        t = r["target"]
        table.add_row(f"{r['from']} -> {r['to']}", ", ".join(_SHORT[k] for k in r["prunes"]), str(t["attention_layers_kept"]),
                      str(t["ffn_layers_kept"]), str(t["num_heads"]), str(t["dim_ff"]),
                      format_count(r["params_non_embedding"]), f"{100 * r['non_embedding_kept']:.1f}%")
    out.print(table)
    _render_memory(summary["memory"])


def _render_memory(memory: dict) -> None:
    from cpmctl.train.memory_plan import TrainPlan, plan_lines

    named = [(f"stage {row['stage']} {phase}", TrainPlan(**{k: v for k, v in row[phase].items()
                                                          if k not in ("needed_bytes", "fits")}))
             for row in memory["stages"] for phase in ("mask", "recovery") if phase in row]
    for line in plan_lines(named, memory["verdict"], f"rows of {memory['seq_len']} tokens"):
        out.print(line, highlight=False)


def _render_stage(report: dict, json_out: bool) -> None:
    if json_out:
        emit_json(report)
        return
    loss, shape = report["loss"], report["shape"]
    out.print(
        f"stage {report['stage']} {report['from']} -> {report['to']} [{report['status']}]: "
        f"attention {shape['attention_layers_kept']}, ffn {shape['ffn_layers_kept']}, heads {shape['num_heads']}, "
        f"dim_ff {shape['dim_ff']}; valid loss {loss['before']:.4f} before, {loss['extracted']:.4f} extracted, "
        f"{loss['recovered']:.4f} recovered -> {report['model']}"
    )
