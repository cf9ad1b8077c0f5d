"""`cpmctl eval`: task metrics of a model or of a predictions file; `eval ppl`; `eval compare`."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import typer
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from cpmctl import CpmctlError
from cpmctl.cli.common import Force, PrintRecipe, emit_json, err, examples, out, recipe_keys, show_recipe
from cpmctl.progress import count_bar
from cpmctl.device import resolve_device, resolve_dtype
from cpmctl.evaluate.compare import compare_models
from cpmctl.evaluate.recipe import EvalRecipe
from cpmctl.evaluate.runner import perplexity
from cpmctl.recipe import default_of


class EvalGroup(TyperGroup):
    """A group whose callback is a command too: words with '=' after `cpmctl eval --task ...` are recipe
    overrides (eval.batch_size=4), not subcommand names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        protected = getattr(ctx, "_protected_args", None)
        if protected and protected[0] not in self.commands and "=" in protected[0]:
            ctx.meta["eval_overrides"] = [*protected, *ctx.args]
            ctx._protected_args, ctx.args = [], []
            return []
        return rest


app = typer.Typer(cls=EvalGroup, help="Evaluate models: task metrics, perplexity, and size-ladder comparisons.",
                  invoke_without_command=True, no_args_is_help=True,
                  epilog=recipe_keys("eval/default") + "\n\n" + examples(
                      "cpmctl eval --task lcsts --data cpmctl/assets/tasks/lcsts-mini --model runs/mini/model "
                      "--recipe eval/lcsts", "cpmctl eval --task lcsts --data test.jsonl --predictions preds.jsonl",
                      "cpmctl eval ppl --model runs/mini/model --data valid.jsonl",
                      "cpmctl eval compare --models a/ b/ c/ --data valid.jsonl --out compare/"))


# `eval ppl` / `eval compare` take no recipe: an option not given leaves the core function's default (shown in the
# help), and device and dtype default to the eval recipe's.
def _defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


_PPL, _COMPARE = _defaults(perplexity), _defaults(compare_models)
DEVICE_HELP = f"cpu, cuda[:N] or auto (default {default_of(EvalRecipe, 'eval.device')})."
DTYPE_HELP = f"fp32, bf16 or fp16 (GPU) (default {default_of(EvalRecipe, 'eval.dtype')})."


def _given(**options) -> dict:
    """The options the user gave (None = not given): the core function's defaults stay the only defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _device_and_dtype(device: str | None, dtype: str | None):
    dev = resolve_device(device or default_of(EvalRecipe, "eval.device"))
    return dev, resolve_dtype(dtype or default_of(EvalRecipe, "eval.dtype"), dev)


def _metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    return table


@app.callback()
def evaluate(
    ctx: typer.Context,
    task: str = typer.Option(None, "--task", help="ccpm, c3, sogou-log, lcsts, kdconv, math23k, or custom."),
    task_def: Path = typer.Option(None, "--task-def", help="YAML task definition for --task custom."),
    template: str = typer.Option(None, "--template", help="Built-in tasks: original (CPM-Live's inputs) or cpmctl "
                                 f"(eval.template, default {default_of(EvalRecipe, 'eval.template')})."),
    data: Path = typer.Option(None, "--data", help="Task data: a .jsonl file, or a directory with train/dev/test.jsonl."),
    model_path: Path = typer.Option(None, "--model", help="Checkpoint to evaluate (any format)."),
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter directory (from `cpmctl tune lora`)."),
    predictions: Path = typer.Option(None, "--predictions", help='Score this jsonl of {"prediction": ...} instead.'),
    out_dir: Path = typer.Option(None, "--out", help="Where predictions.jsonl and scores.json go (default eval-TASK)."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint)."),
    recipe_path: Path = typer.Option(None, "--recipe", help="Recipe YAML or a built-in name (eval/lcsts); KEY=VALUE "
                                     "overrides follow."),
    split: str = typer.Option(None, "--split", help="Split read from a task directory (eval.split, default "
                              f"{default_of(EvalRecipe, 'eval.split')})."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples (or options) per forward pass (eval.batch_size, "
                                   f"default {default_of(EvalRecipe, 'eval.batch_size')})."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N examples."),
    decode: str = typer.Option(None, "--decode", help="Generation tasks: beam, greedy or sample (default: the task's)."),
    beam_size: int = typer.Option(None, "--beam-size"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens"),
    device: str = typer.Option(None, "--device", help="cpu, cuda[:N] or auto (eval.device, default "
                               f"{default_of(EvalRecipe, 'eval.device')})."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (GPU) (eval.dtype, default "
                              f"{default_of(EvalRecipe, 'eval.dtype')})."),
    force: Force = False,
    print_recipe: PrintRecipe = False,
    json_out: bool = typer.Option(False, "--json", help='Print {"task", "n", "metrics": {...}}.'),
):
    """Score a model on a task (decode or score options, then the task's metrics), or score a predictions file."""
    if ctx.invoked_subcommand is not None:
        return
    from cpmctl.evaluate.runner import run_model_eval, run_prediction_eval
    from cpmctl.recipe import load_recipe
    from cpmctl.tasks import get_task

    flags = {"eval.split": split, "eval.template": template, "eval.batch_size": batch_size, "eval.limit": limit, "eval.device": device,
             "eval.dtype": dtype, "decode.decode": decode, "decode.beam_size": beam_size,
             "decode.max_new_tokens": max_new_tokens}
    recipe = load_recipe(EvalRecipe, recipe_path, ctx.meta.get("eval_overrides", []), flags=flags)
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    if task is None:
        raise CpmctlError("--task is required (one of ccpm, c3, sogou-log, lcsts, kdconv, math23k, custom)")
    if data is None:
        raise CpmctlError("--data is required: a task .jsonl file or a directory with train/dev/test.jsonl")
    if (model_path is None) == (predictions is None):
        raise CpmctlError("give --model PATH (run the model) or --predictions FILE.jsonl (score them), one of them")
    task_obj = get_task(task, task_def, recipe.eval.template)
    if predictions is not None:
        if adapter is not None:
            raise CpmctlError("--adapter goes with --model, not with --predictions")
        result = run_prediction_eval(task_obj, data, predictions, recipe, out_dir, force=force)
    else:
        dev = resolve_device(recipe.eval.device)
        with count_bar(f"eval {task_obj.name}") as bar:
            def progress(total: int):
                job = bar.add_task("predict", total=total)
                return lambda n: bar.advance(job, n)

            result = run_model_eval(task_obj, data, model_path, out_dir or Path(f"eval-{task_obj.name}"), recipe,
                                    dev, resolve_dtype(recipe.eval.dtype, dev), adapter=adapter, vocab=vocab,
                                    progress=progress, force=force)
    if json_out:
        emit_json(result.to_json())
        return
    out.print(_metrics_table(f"{result.task}: {result.n} examples", result.metrics))
    if result.predictions_path is not None:
        out.print(f"predictions -> {result.predictions_path}")
    if result.scores_path is not None:
        out.print(f"scores -> {result.scores_path}")


@app.command(epilog=examples("cpmctl eval ppl --model runs/mini/model --data valid.jsonl",
                             "cpmctl eval ppl --model runs/mini/model --data runs/mini/packed/valid --json"))
def ppl(
    model_path: Path = typer.Option(..., "--model", help="Checkpoint (any format)."),
    data: Path = typer.Option(..., "--data", help="Raw text (.jsonl with 'text', or .txt) or a packed data directory."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint)."),
    batch_size: int = typer.Option(None, "--batch-size", help=f"Rows per forward pass (default {_PPL['batch_size']})."),
    max_length: int = typer.Option(None, "--max-length",
                                   help=f"Raw text: tokens per scored window (default {_PPL['max_length']})."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N documents (raw) or rows (packed)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help=DTYPE_HELP),
    json_out: bool = typer.Option(False, "--json", help='Print {"model", "data", "tokens", "loss", "ppl", "bpc"}.'),
):
    """Perplexity = exp(mean token loss) and bits per character of a model on raw text or packed data."""
    dev, torch_dtype = _device_and_dtype(device, dtype)
    with count_bar("ppl") as bar:
        def progress(total: int):
            job = bar.add_task("score", total=total)
            return lambda n: bar.advance(job, n)

        result = perplexity(model_path, data, device=dev, dtype=torch_dtype, vocab=vocab, progress=progress,
                            **_given(batch_size=batch_size, max_length=max_length, limit=limit))
    if json_out:
        emit_json(result.to_json())
        return
    bpc = "n/a" if result.bpc is None else f"{result.bpc:.4f}"
    out.print(f"{model_path}: loss {result.loss:.4f}, ppl {result.ppl:.3f}, bits/char {bpc} "
              f"over {result.tokens:,} tokens ({result.source})")


class ListOptions(TyperCommand):
    """`--models A B C --names a b c`: each word after a list option (up to the next option) is one of its values,
    as if the option were repeated; so `--names` cannot swallow or lose labels."""

    LISTS = ("--models", "--names")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread, current = [], None
        for arg in args:
            if arg in self.LISTS:
                current = arg
            elif arg.startswith("-"):
                current = None
                spread.append(arg)
            elif current is not None:
                spread += [current, arg]
            else:
                spread.append(arg)
        return super().parse_args(ctx, spread)


@app.command(cls=ListOptions, epilog=examples(
    "cpmctl eval compare --models runs/prune/original runs/prune/model --names 10b 7b --data valid.jsonl"))
def compare(
    models: list[Path] = typer.Option(..., "--models", help="Checkpoints to compare, reference first: --models A B C."),
    data: Path = typer.Option(..., "--data", help="Raw text or packed data, the same for every model."),
    names: list[str] = typer.Option(None, "--names", help="Labels for the models (default: directory names)."),
    out_dir: Path = typer.Option(Path("compare"), "--out", help="Where compare.md, compare.png, compare.json go."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside each checkpoint)."),
    batch_size: int = typer.Option(None, "--batch-size",
                                   help=f"Rows per forward pass (default {_COMPARE['batch_size']})."),
    max_length: int = typer.Option(None, "--max-length",
                                   help=f"Raw text: tokens per scored window (default {_COMPARE['max_length']})."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N documents (raw) or rows (packed)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(None, "--dtype", help=DTYPE_HELP),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per model."),
):
    """Loss, perplexity and relative performance (reference loss / loss) of each model, like the CPM-Ant
    README's ladder table: rich table, markdown, and a PNG bar chart."""
    dev, torch_dtype = _device_and_dtype(device, dtype)
    with count_bar("compare") as bar:
        def progress(total: int):
            job = bar.add_task("score", total=total)
            return lambda n: bar.advance(job, n)

        report = compare_models(models, data, out_dir, names=names or None, device=dev, dtype=torch_dtype,
                                vocab=vocab, progress=progress, log=err.print, force=force,
                                **_given(batch_size=batch_size, max_length=max_length, limit=limit))
    if json_out:
        for row in report.rows:
            emit_json(row)
        return
    table = Table(title=f"loss on {data}")
    for col in ("model", "loss", "ppl", "bits/char", "relative"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in report.rows:
        bpc = "n/a" if row["bpc"] is None else f"{row['bpc']:.4f}"
        table.add_row(row["model"], f"{row['loss']:.3f}", f"{row['ppl']:.3f}", bpc, f"{row['relative']:.1f}%")
    out.print(table)
    out.print(f"markdown -> {report.markdown_path}, chart -> {report.chart_path}")
