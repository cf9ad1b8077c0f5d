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
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.filter_rules import RULE_ORDER, DocumentFilter, FilterRecipe, load_blocklist
from cpmctl.data.parallel import ordered_map
from cpmctl.data.textstats import char_classes
from cpmctl.io import make_temp
from cpmctl.data.textio import (
    DEFAULT_CHUNK_BYTES,
    Block,
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
    read_blocks,
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


def _init_worker(recipe: FilterRecipe, blocklist_words, fmt: str, want_rejected: bool, sources: list[str],
                 scored: bool) -> None:
    _state.update(filter=DocumentFilter(recipe, blocklist_words), fmt=fmt, want_rejected=want_rejected,
                  sources=sources, scored=scored)


def filter_block(block: Block) -> dict:
    """The verdicts of a block of lines, ready to write: {"documents", "kept" (the output lines end to end, one
    bytes object: one string to pickle; with the perplexity rule a list of (output line, text, rejected line)
    triples), "kept_ends" (the offset past each kept line), "rejected" (rejected lines), "rules" ({rule: count}),
    "cleaned", "boilerplate_removed", "malformed" [(offset, reason)]}; blank jsonl lines are skipped."""
    check, fmt, want_rejected = _state["filter"], _state["fmt"], _state["want_rejected"]
    source, scored = _state["sources"][block.shard], _state["scored"]
    docs, malformed = [], []
    for i, line in enumerate(block.split()):
        try:
            parsed = parse_line(line, fmt)
        except MalformedLine as e:
            malformed.append((i, str(e)))
            continue
        if parsed is not None:
            docs.append((i, *parsed))
    out = {"documents": len(docs), "kept": [], "rejected": [], "rules": {}, "cleaned": 0, "boilerplate_removed": 0,
           "malformed": malformed}
    for (i, text, record), (kept, rule, reason, edits) in zip(docs, check.batch([d[1] for d in docs])):
        where = f"{source}:{block.first + i + 1}"
        if rule is None:  # edits are counted for the documents kept
            out["cleaned"] += edits["cleaned"]
            out["boilerplate_removed"] += edits["boilerplate_removed"]
            line = format_document(kept, record, fmt)
            if scored:
                line = (line, kept, rejected_line(text, record, "perplexity", "", where) if want_rejected else b"")
            out["kept"].append(line)
        else:
            out["rules"][rule] = out["rules"].get(rule, 0) + 1
            if want_rejected:
                out["rejected"].append(rejected_line(text, record, rule, reason, where))
    if not scored:
        out["kept_ends"] = array("q", accumulate(map(len, out["kept"])))
        out["kept"] = b"".join(out["kept"])
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
            blocks = _count_bytes(shards, chunk_bytes, result, on_progress)
            initargs = (recipe, words, fmt, rejected_writer is not None, [str(s.path) for s in shards], ppl is not None)
            char_classes()  # built once here: forked workers inherit it
            for block, out in ordered_map(filter_block, blocks, workers, _init_worker, initargs):
                for offset, reason in out["malformed"]:
                    errors(shards[block.shard].path, block.first + offset, reason)
                    result.malformed += 1
                result.documents += out["documents"]
                for rule, n in out["rules"].items():
                    result.rejected[rule] += n
                if rejected_writer is not None:
                    for line in out["rejected"]:
                        rejected_writer.write(line)
                result.cleaned += out["cleaned"]
                result.boilerplate_paragraphs_removed += out["boilerplate_removed"]
                if ppl is None:
                    result.kept += len(out["kept_ends"])
                    writer.write_many(out["kept"], out["kept_ends"])
                else:
                    for line, text, rejected_template in out["kept"]:
                        ppl.add(line, text, rejected_template, emit_scored)
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


def _count_bytes(shards: list[Shard], chunk_bytes: int, result: FilterResult, on_progress):
    for index, shard in enumerate(shards):
        for block in read_blocks(shard, index, chunk_bytes):
            result.bytes += len(block.data)
            if on_progress:
                on_progress(len(block.data))
            yield block


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
