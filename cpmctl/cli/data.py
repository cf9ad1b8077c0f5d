"""`cpmctl data ...`: tokenize, filter, dedup, vocab, pack, inspect."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer
from rich.table import Table

from cpmctl import CpmctlError
from cpmctl.cli.common import (DefaultsFrom, Force, JsonFlag, PrintRecipe, emit_json, emit_result, err, examples, out,
                               recipe_keys, require_file, show_recipe)
from cpmctl.data.store import CACHE_MB, DEFAULT_THRESHOLD

app = typer.Typer(help="Tokenize, filter, deduplicate, build vocabularies and pack training data.", no_args_is_help=True)

INPUT_HELP = "Input file, directory or glob (.jsonl / .txt, optionally .gz / .zst); repeat for more."
FORMAT_HELP = "jsonl (field 'text') or text (one document per line, paragraphs separated by <n>); auto = by extension."
WORKERS_HELP = "Worker processes for parsing/hashing/tokenizing (decisions stay in input order)."
STRICT_HELP = "Stop at the first malformed line instead of skipping and counting it."
CHUNK_HELP = "Input is read (and, for dedup, committed) in chunks of about this many MB."


@app.command(epilog=examples("cpmctl data tokenize '今天天气很好' --vocab vocab.txt",
                             "echo 今天天气很好 | cpmctl data tokenize - --vocab vocab.txt --json"))
def tokenize(
    text: str = typer.Argument(..., help="Text to tokenize, or '-' to read stdin (its final newline is dropped)."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary file."),
    json_out: bool = typer.Option(False, "--json", help='Print {"text", "ids", "pieces"}.'),
):
    """Token ids and pieces of a text, exactly as the original tokenizer produces them."""
    from cpmctl.model.tokenizer import CPMAntTokenizer

    if text == "-":
        text = sys.stdin.read().removesuffix("\n")  # `echo TEXT |` adds the newline, the text has none
    if text == "":
        raise CpmctlError("empty text")
    tok = CPMAntTokenizer(require_file(vocab, "vocab file"))
    ids = tok.encode(text)
    pieces = [tok.id_to_token[i] for i in ids]
    if json_out:
        emit_json({"text": text, "ids": ids, "pieces": pieces})
    else:
        out.print(" ".join(str(i) for i in ids))
        out.print(" ".join(pieces), markup=False)


# ----- shared rendering ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def byte_progress(shards, label: str):
    """A progress bar over input bytes on stderr (a spinner-like bar when inputs are compressed)."""
    from cpmctl.data.textio import input_bytes
    from cpmctl.progress import byte_bar

    total = input_bytes(shards)
    with byte_bar(total, label) as advance:
        yield advance


def _warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False, soft_wrap=True)


def _table(title: str, rows: list[tuple]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    return table


def _inputs(inputs: list[str], fmt: str):
    from cpmctl.data.textio import resolve_inputs

    return resolve_inputs(inputs, fmt)


def _chunk_bytes(chunk_mb: float) -> int:
    if chunk_mb <= 0:
        raise CpmctlError(f"--chunk-mb must be positive, got {chunk_mb}")
    return max(1024, int(chunk_mb * (1 << 20)))


def _workers(workers: int | None) -> int:
    from cpmctl.data.parallel import default_workers

    if workers is None:
        return default_workers()
    if workers < 1:
        raise CpmctlError(f"--workers must be >= 1, got {workers}")
    return workers


# ----- filter ------------------------------------------------------------------------------------------------------
@app.command("filter", epilog=recipe_keys("data/filter") + "\n\n" + examples(
    "cpmctl data filter -i raw/ -o clean/ --recipe data/filter --rejected rejected.jsonl",
    "cpmctl data filter -i raw.jsonl -o clean.jsonl min_length.min_chars=200 --json"))
def filter_(
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: section.key=value (min_length.min_chars=50)."),
    inputs: list[str] = typer.Option(None, "--input", "-i", help=INPUT_HELP),
    output: Path = typer.Option(None, "--output", "-o", help="Output file (.jsonl/.txt[.gz|.zst]) or directory of shards."),
    recipe_path: Path = typer.Option(None, "--recipe", help="Filter recipe YAML (recipes/data/filter.yaml)."),
    rejected: Path = typer.Option(None, "--rejected", help="Write every rejected document with its rule and reason (.jsonl)."),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    workers: int = typer.Option(None, "--workers", "-w", help=WORKERS_HELP + " Default: all cores."),
    shard_mb: int = typer.Option(512, "--shard-mb", help="Directory outputs: start a new shard after this many MB."),
    chunk_mb: float = typer.Option(4.0, "--chunk-mb", help=CHUNK_HELP),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    print_recipe: PrintRecipe = False,
    force: Force = False,
    json_out: JsonFlag = False,
):
    """Drop low-quality documents by rules (length, Chinese share, symbols, repetition, boilerplate, blocked words)
    and optionally by perplexity; clean the text of those kept."""
    from cpmctl.data.filter import run_filter
    from cpmctl.data.filter_rules import RULE_ORDER
    from cpmctl.data.recipe import FilterRecipe
    from cpmctl.data.textio import output_spec
    from cpmctl.recipe import load_recipe

    recipe = load_recipe(FilterRecipe, recipe_path, list(overrides or []))
    if print_recipe:
        show_recipe(recipe, json_out)
        return
    if not inputs or output is None:
        raise CpmctlError("data filter needs --input and --output")
    shards = _inputs(inputs, fmt)
    spec = output_spec(output, shards[0].format, shards[0].compression)
    with byte_progress(shards, "filter") as advance:
        result = run_filter(shards, spec, recipe, rejected, _workers(workers), strict, _chunk_bytes(chunk_mb),
                            shard_mb << 20, advance, _warn, force=force)
    if json_out:
        emit_result(result.to_dict(), result.output)
        return
    table = Table(title=f"filter: {result.documents:,} documents, {result.mb_per_s:.1f} MB/s", title_justify="left")
    for col in ("rule", "rejected", "share"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for name in RULE_ORDER:
        n = result.rejected[name]
        table.add_row(name, f"{n:,}", f"{n / max(result.documents, 1):.1%}")
    table.add_row("[bold]kept[/bold]", f"{result.kept:,}", f"{result.kept / max(result.documents, 1):.1%}")
    out.print(table)
    extra = [f"malformed lines skipped {result.malformed:,}", f"cleaned {result.cleaned:,}",
             f"boilerplate paragraphs removed {result.boilerplate_paragraphs_removed:,}"]
    if result.perplexity:
        p = result.perplexity
        extra.append(f"perplexity scored {p['scored']:,}, band [{p['low']}, {p['high']}], median {p.get('median')}")
    out.print("; ".join(extra))
    out.print(f"wrote {result.output}" + (f", rejected to {result.rejected_file}" if result.rejected_file else ""))


# ----- dedup -------------------------------------------------------------------------------------------------------
@app.command(epilog=examples("cpmctl data dedup -i clean/ -o dedup/ --store dedup.sqlite",
                             "cpmctl data dedup -i batch2.jsonl -o batch2.dedup.jsonl --store dedup.sqlite --json"))
def dedup(
    inputs: list[str] = typer.Option(..., "--input", "-i", help=INPUT_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (.jsonl/.txt[.gz|.zst]) or directory of shards."),
    store: Path = typer.Option(..., "--store", help="SQLite store of paragraph hashes (created if missing; persists)."),
    threshold: float = typer.Option(None, "--threshold", help="Duplicate when this share of paragraphs is known "
                                    f"(new store: {DEFAULT_THRESHOLD}; an existing store's value must match)."),
    normalize: bool = typer.Option(None, "--normalize/--no-normalize", help="Hash NFKC-normalised, case-folded "
                                   "paragraphs without punctuation/space (new store: off; must match the store)."),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    workers: int = typer.Option(1, "--workers", "-w", help=WORKERS_HELP),
    shard_mb: int = typer.Option(512, "--shard-mb", help="Directory outputs: start a new shard after this many MB."),
    chunk_mb: float = typer.Option(4.0, "--chunk-mb", help=CHUNK_HELP),
    cache_mb: int = typer.Option(CACHE_MB, "--cache-mb", help="SQLite page cache: bounds memory whatever the store's size."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    force: Force = False,
    json_out: JsonFlag = False,
):
    """Drop documents whose paragraphs were mostly seen before, in this run or any earlier run on the same store.
    Rerunning an interrupted command resumes it; its output equals an uninterrupted run."""
    from cpmctl.data.dedup import dedup as run_dedup
    from cpmctl.data.textio import output_spec

    if cache_mb < 1:
        raise CpmctlError(f"--cache-mb must be >= 1, got {cache_mb}")
    shards = _inputs(inputs, fmt)
    spec = output_spec(output, shards[0].format, shards[0].compression)
    with byte_progress(shards, "dedup") as advance:
        r = run_dedup(shards, spec, store, threshold, normalize, _workers(workers), strict, _chunk_bytes(chunk_mb),
                      shard_mb << 20, advance, _warn, cache_mb, force=force)
    if json_out:
        emit_result(r.to_dict(), r.output)
        return
    out.print(_table(f"dedup (threshold {r.threshold}, normalize {str(r.normalize).lower()})", [
        ("documents in", r.documents), ("kept", r.kept), ("duplicates", r.duplicates), ("empty (dropped)", r.empty),
        ("malformed lines skipped", r.malformed), ("replayed from earlier runs", r.replayed),
        ("paragraphs", r.paragraphs), ("paragraphs added to store", r.new_paragraphs),
        ("store paragraphs", r.store_paragraphs), ("store size", f"{r.store_bytes / 1e6:.1f} MB"),
        ("throughput", f"{r.mb_per_s:.1f} MB/s ({r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s)"),
    ]))
    out.print(f"wrote {r.output}")


# ----- vocab -------------------------------------------------------------------------------------------------------
@app.command(epilog=examples("cpmctl data vocab -i clean/ -o vocab.txt --size 30720"))
def vocab(
    inputs: list[str] = typer.Option(..., "--input", "-i", help=INPUT_HELP),
    out_path: Path = typer.Option(..., "--out", "-o", help="Vocabulary file to write (one token per line)."),
    size: int = typer.Option(30720, "--size", help="Tokens in the vocabulary (the original has 30720)."),
    min_char_count: int = typer.Option(1, "--min-char-count", help="Characters seen fewer times are left out."),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    workers: int = typer.Option(None, "--workers", "-w", help=WORKERS_HELP + " Default: all cores."),
    chunk_mb: float = typer.Option(4.0, "--chunk-mb", help=CHUNK_HELP),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    force: Force = False,
    json_out: JsonFlag = False,
):
    """Learn a vocabulary in the original's format: special tokens, every character seen, the most frequent jieba
    words, and the <s0>.. / ## tail tokens."""
    from cpmctl.data.vocab import build_vocab

    if min_char_count < 1:
        raise CpmctlError(f"--min-char-count must be >= 1, got {min_char_count}")
    shards = _inputs(inputs, fmt)
    with byte_progress(shards, "vocab") as advance:
        r = build_vocab(shards, out_path, size, min_char_count, _workers(workers), strict, _chunk_bytes(chunk_mb),
                        advance, _warn, force=force)
    if json_out:
        emit_result(r.to_dict(), r.path)
        return
    out.print(_table(f"vocab {r.path}", [
        ("tokens", r.size), ("characters", r.characters), ("words", r.words),
        ("<s0>.. and ## tail", "yes" if r.tail else "no (size too small)"), ("documents", r.documents),
        ("md5", r.md5),
    ]))


# ----- pack --------------------------------------------------------------------------------------------------------
@app.command(cls=DefaultsFrom("cpmctl.data.pack:PackSettings"),
             epilog=examples("cpmctl data pack -i clean/ --vocab vocab.txt -o packed/ --max-length 512 --valid-fraction 0.01"))
def pack(
    inputs: list[str] = typer.Option(..., "--input", "-i", help=INPUT_HELP),
    vocab_path: Path = typer.Option(..., "--vocab", help="Vocabulary file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory (train/ and valid/ packed datasets)."),
    max_length: int = typer.Option(None, "--max-length", help="Row length; pieces are max_length - 34 tokens "
                                   "(default {max_length})."),
    valid_fraction: float = typer.Option(None, "--valid-fraction", help="Share of documents held out in OUT/valid "
                                         "(default {valid_fraction})."),
    seed: int = typer.Option(None, "--seed", help="Seed for lm/mlm choice, masks and the validation split "
                             "(default {seed})."),
    mask_ratio: float = typer.Option(None, "--mask-ratio", help="A fixed share of an mlm piece's tokens to predict "
                                     "(default {mask_ratio}; None = the original's random count)."),
    later_prompts: str = typer.Option(None, "--later-prompts", help="Prompt slots of a row's later records: "
                                      "prompt-embedding (each record its own, the default) or input-embedding (the "
                                      "original's quirk: read as vocabulary ids 32..95)."),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    workers: int = typer.Option(None, "--workers", "-w", help=WORKERS_HELP + " Default: all cores."),
    chunk_mb: float = typer.Option(1.0, "--chunk-mb", help=CHUNK_HELP),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    force: Force = False,
    json_out: JsonFlag = False,
):
    """Tokenize documents and cut them into the original's lm/mlm records, packed into memory-mapped rows."""
    from cpmctl.data.pack import PackSettings, pack as run_pack

    given = {"max_length": max_length, "seed": seed, "valid_fraction": valid_fraction, "mask_ratio": mask_ratio,
             "later_prompts": later_prompts}
    settings = PackSettings(**{k: v for k, v in given.items() if v is not None})  # its defaults are the only ones
    shards = _inputs(inputs, fmt)
    with byte_progress(shards, "pack") as advance:
        r = run_pack(shards, require_file(vocab_path, "vocab file"), out_dir, settings, _workers(workers), strict,
                     _chunk_bytes(chunk_mb), advance, _warn, force=force)
    if json_out:
        emit_result(r.to_dict(), r.out)
        return
    rows = [("documents", r.documents), ("documents under 32 tokens", r.short_documents), ("tokens", r.tokens),
            ("malformed lines skipped", r.malformed)]
    for name, s in r.splits.items():
        tasks = ", ".join(f"{k} {v:,}" for k, v in s["records_per_task"].items())
        rows.append((f"{name}", f"{s['rows']:,} rows, {s['records']:,} records ({tasks}), fill {s['fill']:.1%}"))
    out.print(_table(f"pack {r.out} ({r.seconds:.1f} s)", rows))


# ----- inspect -----------------------------------------------------------------------------------------------------
@app.command(epilog=examples("cpmctl data inspect packed/ --rows 1", "cpmctl data inspect packed/train --json"))
def inspect(
    path: Path = typer.Argument(..., help="A `data pack` output directory, or one packed dataset in it."),
    vocab_path: Path = typer.Option(None, "--vocab", help="Vocabulary (default: vocab.txt of the pack output)."),
    rows: int = typer.Option(2, "--rows", help="Rows to decode from each split."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per split."),
):
    """Counts of a packed dataset (rows, records per task, tokens, fill) and a few records decoded; the tokens to
    predict are shown ⟦like this⟧."""
    from cpmctl.data.pack import inspect_splits

    result = inspect_splits(require_file(path, "packed dataset"), vocab_path, rows)
    for name, info in result.items():
        if json_out:
            emit_json({"split": name, **info})
            continue
        tasks = ", ".join(f"{k} {v:,}" for k, v in info["records_per_task"].items())
        out.print(_table(f"{name}: {info['path']}", [
            ("rows", info["rows"]), ("max_length", info["max_length"]), ("records", f"{info['records']:,} ({tasks})"),
            ("tokens", info["tokens"]), ("target tokens", info["target_tokens"]), ("fill", f"{info['fill']:.1%}"),
            *((f"{name} objective", f"{c['records']:,} records, {c['tokens']:,} tokens, {c['predicted']:,} predicted "
               f"({c['predicted'] / max(c['tokens'], 1):.1%})") for name, c in info["objectives"].items()),
            ("vocab", f"{info['vocab_size']:,} tokens, md5 {info['vocab_md5']}"),
        ]))
        for sample in info["samples"]:
            out.print(f"[bold]row {sample['row']} · {sample['task']} · {sample['tokens']} tokens, "
                      f"{sample['predicted']} to predict[/bold]")
            out.print(sample["text"], markup=False)
