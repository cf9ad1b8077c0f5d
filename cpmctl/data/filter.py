"""`data filter`: stream a corpus through the rules of a FilterRecipe, in worker processes, in input order.

Kept documents go to the output in the input's format (jsonl fields carried through, the text replaced by its
cleaned form); each rejected document goes to the `--rejected` jsonl file with its rule and reason. The perplexity
rule scores the documents that pass every text rule with a cpmctl checkpoint, batched, in the main process; with a
percentile band the scored documents wait in a spool file beside the output until the band is known.
"""

from __future__ import annotations

import json
import math
import pickle
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.filter_rules import RULE_ORDER, DocumentFilter, FilterRecipe, load_blocklist
from cpmctl.data.parallel import ordered_map
from cpmctl.io import make_temp
from cpmctl.data.textio import (
    DEFAULT_CHUNK_BYTES,
    DocumentWriter,
    LineErrors,
    MalformedLine,
    OutputSpec,
    Shard,
    check_readable,
    claim_output,
    format_document,
    output_spec,
    parse_line,
    read_chunks,
)


@dataclass
class FilterResult:
    files: int = 0
    documents: int = 0
    kept: int = 0
    malformed: int = 0
    rejected: dict = field(default_factory=lambda: {name: 0 for name in RULE_ORDER})
    cleaned: int = 0  # documents whose text cleanup changed
    boilerplate_paragraphs_removed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    output: str = ""
    rejected_file: str | None = None
    perplexity: dict | None = None  # thresholds used and score summary

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rejected_total"] = sum(self.rejected.values())
        d["seconds"] = round(self.seconds, 3)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        return d


# ----- worker side ---------------------------------------------------------------------------------------------
_state: dict = {}


def _init_worker(recipe: FilterRecipe, blocklist_words, fmt: str, want_rejected: bool, source: str) -> None:
    _state.update(filter=DocumentFilter(recipe, blocklist_words), fmt=fmt, want_rejected=want_rejected, source=source)


def filter_lines(item: tuple[int, list[bytes]]) -> list[tuple]:
    """Per line: ("k", offset, output line, text, edits) | ("r", offset, rule, reason, rejected line | None)
    | ("m", offset, reason); blank jsonl lines are skipped."""
    check, fmt, want_rejected, source = _state["filter"], _state["fmt"], _state["want_rejected"], _state["source"]
    first, lines = item
    out = []
    for i, line in enumerate(lines):
        try:
            parsed = parse_line(line, fmt)
        except MalformedLine as e:
            out.append(("m", i, str(e)))
            continue
        if parsed is None:
            continue
        text, record = parsed
        kept, rule, reason, edits = check(text)
        if rule is None:
            out.append(("k", i, format_document(kept, record, fmt), kept, edits))
        else:
            where = f"{source}:{first + i + 1}"
            out.append(("r", i, rule, reason, rejected_line(text, record, rule, reason, where) if want_rejected else None))
    return out


def rejected_line(text: str, record: dict | None, rule: str, reason: str, source: str | None = None) -> bytes:
    """A `--rejected` jsonl line: the original record (or {"text"} for plain text) plus {"filter": ...}."""
    entry = dict(record) if record is not None else {"text": text}
    entry["filter"] = {"rule": rule, "reason": reason}
    if source:
        entry["filter"]["source"] = source
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


# ----- the perplexity stage ------------------------------------------------------------------------------------
class PerplexityStage:
    """Scores kept documents in batches; decides at once (max_perplexity) or after a percentile band is known."""

    def __init__(self, recipe: FilterRecipe, output: Path):
        self.rule = recipe.perplexity
        self.band = self.rule.percentile_low is not None or self.rule.percentile_high is not None
        self.pending: list[tuple[bytes, str, bytes]] = []  # (output line, text, rejected line)
        self.model = self.tokenizer = None
        self.scores: list[float] = []
        self.spool = None
        self.output = output  # the spool is a temp file beside it (removed by the next run if this one is killed)

    def _load(self) -> None:
        # Loaded on first use: the worker pool has been forked by then, so workers do not inherit the model.
        from cpmctl.device import resolve_device, resolve_dtype
        from cpmctl.model.checkpoint import load_model, load_tokenizer

        device = resolve_device(self.rule.device, what="perplexity.device")
        self.model, _ = load_model(self.rule.model, device=device, dtype=resolve_dtype(self.rule.dtype, device, what="perplexity.dtype"))
        self.tokenizer = load_tokenizer(self.rule.model, self.rule.vocab, self.model.config.vocab_size)

    def add(self, out_line: bytes, text: str, rejected: bytes, emit: Callable) -> None:
        self.pending.append((out_line, text, rejected))
        if len(self.pending) >= 16 * self.rule.batch_size:
            self.flush(emit)

    def flush(self, emit: Callable) -> None:
        if not self.pending:
            return
        from cpmctl.model.perplexity import score_documents

        if self.model is None:
            self._load()
        scores = score_documents(self.model, self.tokenizer, [p[1] for p in self.pending], self.rule.max_length,
                                 self.rule.batch_size)
        for (out_line, _, rejected), score in zip(self.pending, scores):
            ppl = score.perplexity
            self.scores.append(ppl)
            if self.band:
                if self.spool is None:
                    name = make_temp(self.output, suffix=".spool.tmp")
                    self.spool = (open(name, "w+b"), name)
                pickle.dump((ppl, out_line, rejected), self.spool[0])
            else:
                emit(ppl, out_line, rejected, self.rule.max_perplexity, None)
        self.pending = []

    def finish(self, emit: Callable) -> dict:
        self.flush(emit)
        finite = np.array([s for s in self.scores if math.isfinite(s)], dtype=np.float64)
        low = high = None
        if self.band and finite.size:
            if self.rule.percentile_low is not None:
                low = float(np.percentile(finite, self.rule.percentile_low))
            if self.rule.percentile_high is not None:
                high = float(np.percentile(finite, self.rule.percentile_high))
        if self.rule.max_perplexity is not None:
            high = self.rule.max_perplexity if high is None else min(high, self.rule.max_perplexity)
        if self.spool is not None:
            f, path = self.spool
            f.seek(0)
            try:
                while True:
                    try:
                        ppl, out_line, rejected = pickle.load(f)
                    except EOFError:
                        break
                    emit(ppl, out_line, rejected, high, low)
            finally:
                f.close()
                path.unlink(missing_ok=True)
        summary = {"scored": len(self.scores), "low": low, "high": high}
        if finite.size:
            summary.update(median=float(np.median(finite)), mean=float(finite.mean()))
        return summary

    def abort(self) -> None:
        if self.spool is not None:
            self.spool[0].close()
            self.spool[1].unlink(missing_ok=True)


# ----- the run -------------------------------------------------------------------------------------------------
def run_filter(
    shards: list[Shard],
    output: OutputSpec,
    recipe: FilterRecipe,
    rejected: str | Path | None = None,
    workers: int = 1,
    strict: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = 512 << 20,
    on_progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    force: bool = False,
) -> FilterResult:
    """Outputs follow the output policy (cpmctl/outputs.py): never an input, never what another command wrote
    (unless `force`), checked before any work."""
    recipe.validate()
    rejected_spec = _rejected_spec(rejected) if rejected else None
    inputs = [s.path for s in shards] + [recipe.blocklist.file if recipe.blocklist.enabled else None,
                                         recipe.perplexity.model if recipe.perplexity.enabled else None]
    if rejected_spec is not None:
        rej, out = os.path.realpath(rejected_spec.path), os.path.realpath(output.path)
        if rej == out or (output.is_dir and rej.startswith(out + os.sep)):
            raise CpmctlError(f"--rejected {rejected}: is --output or inside it; give the rejected documents their own "
                              "file beside the output")
    claims = [claim_output(output, "data filter", inputs, force)]
    if rejected_spec is not None:
        claims.append(claim_output(rejected_spec, "data filter", inputs, force, what="--rejected"))
    words = load_blocklist(recipe.blocklist.file) if recipe.blocklist.enabled else None
    check_readable(shards)
    fmt = shards[0].format
    start = time.perf_counter()
    errors = LineErrors(strict, warn)
    result = FilterResult(files=len(shards), output=str(output.path),
                          rejected_file=str(rejected) if rejected else None)
    ppl = PerplexityStage(recipe, output.path) if recipe.perplexity.enabled else None
    with DocumentWriter(output, shard_bytes, claims[0]) as writer, \
            _maybe_writer(rejected_spec, claims[1:]) as rejected_writer:

        def reject(rule: str, line: bytes | None) -> None:
            result.rejected[rule] += 1
            if rejected_writer is not None and line is not None:
                rejected_writer.write(line)

        def emit_scored(score: float, out_line: bytes, rejected_line_: bytes, high, low) -> None:
            if not math.isfinite(score) or (high is not None and score > high) or (low is not None and score < low):
                band = f"[{'-' if low is None else f'{low:.1f}'}, {'-' if high is None else f'{high:.1f}'}]"
                reason = f"perplexity {score:.1f} outside {band}"
                reject("perplexity", _with_reason(rejected_line_, reason) if rejected_writer else None)
            else:
                result.kept += 1
                writer.write(out_line)

        try:
            for shard in shards:
                items = _count_bytes(read_chunks(shard, chunk_bytes), result, on_progress)
                initargs = (recipe, words, fmt, rejected_writer is not None, str(shard.path))
                for (first, lines), outcome in ordered_map(filter_lines, items, workers, _init_worker, initargs):
                    for entry in outcome:
                        kind, offset = entry[0], entry[1]
                        if kind == "m":
                            errors(shard.path, first + offset, entry[2])
                            result.malformed += 1
                            continue
                        result.documents += 1
                        if kind == "r":
                            reject(entry[2], entry[4])
                            continue
                        _, _, out_line, text, edits = entry
                        result.cleaned += edits["cleaned"]
                        result.boilerplate_paragraphs_removed += edits["boilerplate_removed"]
                        if ppl is None:
                            result.kept += 1
                            writer.write(out_line)
                        else:
                            parsed = parse_line(lines[offset], fmt) if rejected_writer is not None else None
                            line = rejected_line(parsed[0], parsed[1], "perplexity", "", f"{shard.path}:{first + offset + 1}") \
                                if parsed else b""
                            ppl.add(out_line, text, line, emit_scored)
            if ppl is not None:
                result.perplexity = ppl.finish(emit_scored)
        except BaseException:
            if ppl is not None:
                ppl.abort()
            raise
        result.seconds = time.perf_counter() - start
        if rejected_writer is not None:
            rejected_writer.close()
        writer.close(command="filter", **{k: v for k, v in result.to_dict().items() if k != "output"})
    return result


def _count_bytes(chunks, result: FilterResult, on_progress):
    for first, lines in chunks:
        n = sum(map(len, lines))
        result.bytes += n
        if on_progress:
            on_progress(n)
        yield first, lines


def _with_reason(line: bytes, reason: str) -> bytes:
    entry = json.loads(line)
    entry["filter"]["reason"] = reason
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def _rejected_spec(path: str | Path) -> OutputSpec:
    path = Path(path)
    spec = output_spec(path, "jsonl", None)
    if spec.is_dir:
        raise CpmctlError(f"--rejected {path}: name a .jsonl file (optionally .gz/.zst)")
    return spec


class _NoWriter:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _maybe_writer(spec: OutputSpec | None, output: list):
    return DocumentWriter(spec, output=output[0]) if spec is not None else _NoWriter()
