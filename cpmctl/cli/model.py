"""`cpmctl model init|info|convert`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cpmctl.cli.common import Force, emit_json, emit_result, err, examples, format_count, out, require_file
from cpmctl.model.generation_config import GenerationConfig

app = typer.Typer(help="Create, inspect and convert CPM-Ant checkpoints.", no_args_is_help=True)


@app.command(epilog=examples("cpmctl model init --config mini-10b --vocab vocab.txt --out runs/init",
                             "cpmctl model init --config my-config.json --vocab vocab.txt --out ckpt/ --seed 1 --json"))
def init(
    config: str = typer.Option(..., "--config", help="Ladder name (10b, 7b, mini-10b, ...) or a config JSON file."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary file (ant.txt or one built by `cpmctl data vocab`)."),
    out_dir: Path = typer.Option(..., "--out", help="Output checkpoint directory (native format)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the initialisation."),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """A randomly initialised model (the original's init) in the native format."""
    from cpmctl.model.create import init_checkpoint

    result = init_checkpoint(config, require_file(vocab, "vocab file"), out_dir, seed, note=err.print, force=force)
    if json_out:
        emit_result(result, out_dir)
    else:
        out.print(f"initialised {config} ({format_count(result['params_total'])} parameters, seed {seed}) -> {out_dir}")


@app.command(epilog=examples("cpmctl model info 10b", "cpmctl model info runs/mini/model --json",
                             "cpmctl model info 10b --memory-limit 16 --device cuda --dtype fp16"))
def info(
    path: str = typer.Argument(..., help="A checkpoint (any format), a config JSON file, or a ladder name."),
    memory_limit: float = typer.Option(None, "--memory-limit", help="Print the memory plan for this many GB."),
    device: str = typer.Option("auto", "--device", help="Plan for: cpu, cuda or auto."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, bf16, fp16 (default: fp16 on cuda for half configs)."),
    quantize: str = typer.Option(None, "--quantize", help="Plan with quantized linears: int8 or int4."),
    batch_rows: int = typer.Option(1, "--batch-rows", help="Plan: rows decoded together (batch x beam)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Plan: prompt length in tokens."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", help="Plan: tokens to generate."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Config, kept layers, heads, dim_ff and parameter counts (computed from the config, no weights loaded);
    with --memory-limit, the plan of memory-limited generation: resident vs streamed blocks, expected memory."""
    from cpmctl.model.create import describe

    d = describe(path)
    plan = None
    if memory_limit is not None or quantize is not None:
        plan = _memory_plan(path, memory_limit, device, dtype, quantize, batch_rows, prompt_tokens, max_new_tokens)
        d["memory_plan"] = plan.to_dict()
    if json_out:
        emit_json(d)
        return
    table = Table(title=f"{path} ({d['format']})", show_header=False)
    for k, v in d.items():
        if k in ("path", "memory_plan"):
            continue
        table.add_row(k, format_count(v) + f" ({v:,})" if k.startswith("params_") else str(v))
    out.print(table)
    if plan is not None:
        from cpmctl.generate.plan import plan_table

        plan_rows = Table(title="memory plan", show_header=False)
        for label, value in plan_table(plan):
            plan_rows.add_row(label, value)
        out.print(plan_rows)


def _memory_plan(path, memory_limit, device, dtype, quantize, batch_rows, prompt_tokens, max_new_tokens):
    """The plan `generate` would make for --batch-rows greedy prompts of --prompt-tokens tokens decoded together."""
    from cpmctl.device import resolve_device, resolve_dtype
    from cpmctl.generate.plan import plan_generation
    from cpmctl.model.checkpoint import read_config
    from cpmctl.model.config import resolve_config

    cfg = read_config(path)[0] if Path(path).exists() and Path(path).suffix != ".json" else resolve_config(path)
    dev = resolve_device(device)
    dtype = dtype or ("fp16" if cfg.half and dev.type == "cuda" else "fp32")
    return plan_generation(cfg, [prompt_tokens] * max(batch_rows, 1), batch_size=batch_rows,
                           batch_option="--batch-rows", decoding=GenerationConfig(decode="greedy", max_new_tokens=max_new_tokens),
                           device=dev, dtype=resolve_dtype(dtype, dev), memory_limit_gb=memory_limit, quantize=quantize)


@app.command(epilog=examples("cpmctl model convert cpm-ant-10b.pt --to native --out cpm-ant-10b/",
                             "cpmctl model convert runs/prune/model --to hf --out hf-model/ --json"))
def convert(
    path: Path = typer.Argument(..., help="Source checkpoint (native dir, original .pt, or HF directory)."),
    to: str = typer.Option(..., "--to", help="Target format: native, original or hf."),
    out_path: Path = typer.Option(..., "--out", help="Output directory (native, hf) or .pt file (original)."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file to store with the output."),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Convert between formats. native <-> original is a lossless re-container (bit-exact in any dtype); --to hf
    writes a transformers CpmAntForCausalLM directory (pruned models too) with its tokenizer and generation config."""
    from cpmctl.model.checkpoint import convert as convert_checkpoint
    from cpmctl.model.checkpoint import detect_format

    src_fmt = detect_format(path)
    result = convert_checkpoint(path, to, out_path, vocab=vocab, force=force)
    summary = {"source": str(path), "source_format": src_fmt, "format": to, "out": str(result)}
    if to == "hf":  # the HF tokenizer needs the vocabulary: say when there was none to write
        summary["tokenizer"] = (Path(result) / "tokenizer_config.json").exists()
    if json_out:
        emit_result(summary, result)
    else:
        out.print(f"{path} ({src_fmt}) -> {result} ({to})")
        if summary.get("tokenizer") is False:
            err.print("no vocab.txt beside the source and no --vocab: no tokenizer files written")
