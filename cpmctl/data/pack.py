"""`data pack`: tokenize documents and cut them into the original's training records, packed into fixed-length rows
of a memory-mapped dataset (cpmctl/data/packed_format.py; docs/formats.md, "Packed data").

Records (shared/reference/cpm-ant.md section 7): a document's tokens (<unk> dropped) are cut into pieces of
max_length - 34 tokens (990 for 1024); a piece under 32 tokens ends the document. Each piece is, with probability
1/2, an lm record (prompt task 2, segment 2, a random-length suffix to predict) or an mlm record (prompt task 1,
segment 1, random positions to predict, tokens not replaced). A record is the 32 prompt slots (segment 0, given)
+ [<s>] + piece + [</s>]; target[i] = token[i+1] where token i+1 is to be predicted (context False), else -100.
Records are packed first-fit into max_length rows, one span id per record, padding in a span of its own.

Randomness comes from (seed, input file, line), so the result is the same for any --workers. A document goes to
the validation split when a hash of (seed, file, line) falls under --valid-fraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import xxhash

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedWriter
from cpmctl.data.parallel import ordered_map
from cpmctl.data.textio import DEFAULT_CHUNK_BYTES, Block, LineErrors, MalformedLine, Shard, check_readable, parse_line, read_blocks
from cpmctl.model import inputs
from cpmctl.model.inputs import LM_TASK, MLM_SEGMENT, MLM_TASK, PROMPT_LENGTH, TASK_NAMES, TEXT_SEGMENT, Record, pack_row
from cpmctl.model.tokenizer import BOS, EOS, CPMAntTokenizer
from cpmctl.io import commit_dir, disk_full_error, make_temp, remove
from cpmctl.outputs import claim

MIN_PIECE = 32
RESERVED = PROMPT_LENGTH + 2  # prompt slots + <s> + </s>


@dataclass
class PackSettings:
    max_length: int = 1024
    seed: int = 0
    valid_fraction: float = 0.0
    # mlm: None = the original's count, k = randint(1, n - 1) of the record's n tokens (about half on average);
    # a number = that fixed share of them instead (the BERT-style alternative).
    mask_ratio: float | None = None
    lm_fraction: float = 0.5
    pack_window: int = 64  # open rows first-fit chooses among
    # Where the prompt slots of the 2nd, 3rd... record of a row are looked up: "prompt-embedding" (each record its
    # own prompt, the default) or "input-embedding" (the original's quirk; docs/data.md has the measured effect).
    later_prompts: Literal["prompt-embedding", "input-embedding"] = "prompt-embedding"

    @property
    def piece_length(self) -> int:
        return self.max_length - RESERVED

    def validate(self) -> None:
        if self.max_length < RESERVED + MIN_PIECE:
            raise CpmctlError(f"--max-length must be at least {RESERVED + MIN_PIECE}, got {self.max_length}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise CpmctlError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio <= 1.0:
            raise CpmctlError(f"--mask-ratio must be in (0, 1], got {self.mask_ratio}")
        if self.later_prompts not in ("prompt-embedding", "input-embedding"):
            raise CpmctlError(f"--later-prompts must be prompt-embedding or input-embedding, got {self.later_prompts!r}")
        if not 0.0 <= self.lm_fraction <= 1.0:
            raise CpmctlError(f"lm fraction must be in [0, 1], got {self.lm_fraction}")


def make_record(piece: list[int], task: int, rng: random.Random, vocab_size: int,
                mask_ratio: float | None = None) -> Record:
    """One training record from a piece of token ids: [<s>] + piece + [</s>] (n tokens) after the prompt slots of
    `task`, predicted as the original's pretraining task does (training_tasks/ant/pretrain.py): lm predicts a
    suffix of randint(1, n - 1) tokens (it can be </s> alone, or everything after <s>); mlm predicts
    randint(1, n - 1) positions drawn without replacement from 1..n - 1 (</s> included, <s> never)."""
    text = [BOS] + piece + [EOS]
    n = len(text)
    predicted = np.zeros(n, dtype=bool)
    if task == LM_TASK:
        predicted[n - rng.randint(1, n - 1) :] = True
    else:
        k = rng.randint(1, n - 1) if mask_ratio is None else max(1, round((n - 1) * mask_ratio))
        predicted[rng.sample(range(1, n), k)] = True
    segment = TEXT_SEGMENT if task == LM_TASK else MLM_SEGMENT
    return inputs.make_record(text, predicted, vocab_size, task, segment)


def document_rng(seed: int, shard_index: int, line: int) -> random.Random:
    return random.Random(xxhash.xxh64_intdigest(f"{seed}:{shard_index}:{line}".encode()))


def in_valid_split(seed: int, shard_index: int, line: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = xxhash.xxh64_intdigest(f"valid:{seed}:{shard_index}:{line}".encode())
    return h / 2.0**64 < fraction


def document_records(ids: list[int], settings: PackSettings, rng: random.Random, vocab_size: int) -> list[Record]:
    records = []
    step = settings.piece_length
    for start in range(0, len(ids), step):
        piece = ids[start : start + step]
        if len(piece) < MIN_PIECE:
            break
        task = LM_TASK if rng.random() < settings.lm_fraction else MLM_TASK
        records.append(make_record(piece, task, rng, vocab_size, settings.mask_ratio))
    return records


# ----- worker side ---------------------------------------------------------------------------------------------
_state: dict = {}


def _init_worker(vocab: str, settings: PackSettings, fmt: str) -> None:
    _state.update(tokenizer=CPMAntTokenizer(vocab), settings=settings, fmt=fmt)


def records_for_chunk(block: Block) -> dict:
    """Records of every document of a block: {"docs": [(valid, [records])], "tokens", "malformed"}."""
    tok, settings, fmt = _state["tokenizer"], _state["settings"], _state["fmt"]
    first, shard = block.first, block.shard
    docs, malformed, tokens = [], [], 0
    for i, line in enumerate(block.split()):
        try:
            parsed = parse_line(line, fmt, strip=True)
        except MalformedLine as e:
            malformed.append((i, str(e)))
            continue
        if parsed is None:
            continue
        ids = tok.encode_for_model(parsed[0])
        tokens += len(ids)
        rng = document_rng(settings.seed, shard, first + i)
        valid = in_valid_split(settings.seed, shard, first + i, settings.valid_fraction)
        docs.append((valid, document_records(ids, settings, rng, tok.vocab_size)))
    return {"docs": docs, "tokens": tokens, "malformed": malformed}


# ----- main side: packing rows ---------------------------------------------------------------------------------
class RowPacker:
    """First-fit packing of records into max_length rows among a window of open rows; a row leaves the window
    (is written) when full or when the window needs room, so output order is deterministic."""

    def __init__(self, writer: PackedWriter, max_length: int, window: int, quirk_vocab_size: int | None = None):
        self.writer, self.max_length, self.window = writer, max_length, window
        self.quirk_vocab_size = quirk_vocab_size
        self.open: list[list[Record]] = []
        self.used: list[int] = []
        self.objectives = {name: {"records": 0, "tokens": 0, "predicted": 0} for name in TASK_NAMES.values()}
        self.tokens = 0

    def add(self, record: Record) -> None:
        n = len(record)
        counts = self.objectives[TASK_NAMES[record.task]]
        counts["records"] += 1
        counts["tokens"] += n
        counts["predicted"] += int((record.context == 0).sum())
        self.tokens += n
        for i, used in enumerate(self.used):
            if used + n <= self.max_length:
                self.open[i].append(record)
                self.used[i] += n
                if self.used[i] == self.max_length:
                    self._write(i)
                return
        if len(self.open) >= self.window:
            self._write(max(range(len(self.used)), key=lambda i: self.used[i]))
        self.open.append([record])
        self.used.append(n)
        if n == self.max_length:
            self._write(len(self.open) - 1)

    def _write(self, i: int) -> None:
        records = self.open.pop(i)
        self.used.pop(i)
        self.writer.add_row(**pack_row(records, self.max_length, self.quirk_vocab_size))

    def finish(self) -> None:
        while self.open:
            self._write(0)


@dataclass
class PackResult:
    out: str
    documents: int = 0
    malformed: int = 0
    short_documents: int = 0  # fewer than 32 tokens: no record
    tokens: int = 0  # document tokens after <unk> removal
    bytes: int = 0
    seconds: float = 0.0
    splits: dict = field(default_factory=dict)  # train/valid: rows, records per task, fill

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 3)
        return d


def pack(
    shards: list[Shard],
    vocab: str | Path,
    out: str | Path,
    settings: PackSettings,
    workers: int = 1,
    strict: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    force: bool = False,
) -> PackResult:
    """`out` (train/, valid/, vocab.txt) is built whole beside it and swapped in when complete, by the output
    policy of cpmctl/outputs.py (checked before any work)."""
    settings.validate()
    out = Path(out)
    output = claim(out, "data pack", force=force, inputs=[*(s.path for s in shards), vocab],
                   accept=lambda p: (p / "train" / "meta.json").exists())
    tokenizer = CPMAntTokenizer(vocab)  # checks the vocabulary before any work
    check_readable(shards)
    vocab_bytes = Path(vocab).read_bytes()
    vocab_md5 = hashlib.md5(vocab_bytes).hexdigest()
    errors = LineErrors(strict, warn)
    result = PackResult(str(out))
    start = time.perf_counter()
    meta = {"vocab_md5": vocab_md5, "seed": settings.seed, "sources": [str(s.path) for s in shards],
            "settings": settings.__dict__ | {"piece_length": settings.piece_length}}
    split_names = ["train", "valid"] if settings.valid_fraction > 0 else ["train"]
    build = make_temp(out, directory=True)
    writers = {name: PackedWriter(build / name, settings.max_length, tokenizer.vocab_size, split=name, **meta)
               for name in split_names}
    quirk = tokenizer.vocab_size if settings.later_prompts == "input-embedding" else None
    packers = {name: RowPacker(w, settings.max_length, settings.pack_window, quirk) for name, w in writers.items()}
    try:
        blocks = (block for index, shard in enumerate(shards) for block in read_blocks(shard, index, chunk_bytes))
        initargs = (str(vocab), settings, shards[0].format)
        for block, res in ordered_map(records_for_chunk, blocks, workers, _init_worker, initargs):
            for offset, reason in res["malformed"]:
                errors(shards[block.shard].path, block.first + offset, reason)
            result.malformed += len(res["malformed"])
            result.tokens += res["tokens"]
            for valid, records in res["docs"]:
                result.documents += 1
                result.short_documents += not records
                packer = packers["valid" if valid else "train"]
                for r in records:
                    packer.add(r)
            result.bytes += len(block.data)
            if on_progress:
                on_progress(len(block.data))
        for name, packer in packers.items():
            packer.finish()
            w = writers[name]
            fill = packer.tokens / (w.rows * settings.max_length) if w.rows else 0.0
            per_task = {name: c["records"] for name, c in packer.objectives.items()}
            summary = {"rows": w.rows, "records": sum(per_task.values()), "records_per_task": per_task,
                       "objectives": packer.objectives,
                       "tokens": packer.tokens, "fill": round(fill, 4)}
            w.close(**summary)
            result.splits[name] = summary
    except BaseException as e:
        for w in writers.values():
            if w.tmp.exists():
                with contextlib.suppress(OSError):  # a full disk fails the close too; the temp goes anyway
                    w.abort()
        remove(build)
        full = disk_full_error(e, out, "the packed rows") if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    try:
        shutil.copyfile(vocab, build / "vocab.txt")
        output.stamp(build)
        commit_dir(build, out)
    except BaseException:
        remove(build)
        raise
    result.seconds = time.perf_counter() - start
    return result


# ----- inspection ----------------------------------------------------------------------------------------------
def split_dirs(path: str | Path) -> dict[str, Path]:
    """The packed datasets under `path`: its train/valid splits, or `path` itself."""
    path = Path(path)
    if (path / "meta.json").exists():
        return {path.name: path}
    for name in ("train", "valid"):
        if (path / name).is_dir() and not (path / name / "meta.json").exists():
            raise CpmctlError(f"{path / name}: a split without meta.json (an unfinished or damaged `data pack` "
                              "output); pack it again")
    found = {name: path / name for name in ("train", "valid") if (path / name / "meta.json").exists()}
    if not found:
        raise CpmctlError(f"{path}: not a packed dataset (no meta.json, no train/ or valid/; see `cpmctl data pack`)")
    return found


def decode_records(dataset: PackedDataset, row: int, tokenizer: CPMAntTokenizer) -> list[dict]:
    """The records of one row: task, length, and the text with the tokens to predict marked ⟦like this⟧."""
    r = dataset.rows(row)
    records = []
    for span in np.unique(r["span"]):
        sel = r["span"] == span
        task = int(r["task"][sel][0])
        if task < 0:
            continue
        ids, ctx = r["input"][sel], r["context"][sel]
        text_ids = [(int(i), bool(c)) for i, c in zip(ids, ctx) if i < dataset.vocab_size]
        parts, inside = [], False
        for tok, given in text_ids:
            if not given and not inside:
                parts.append("⟦")
            elif given and inside:
                parts.append("⟧")
            inside = not given
            parts.append(tokenizer.decode([tok]))
        if inside:
            parts.append("⟧")
        records.append({"task": TASK_NAMES.get(task, str(task)), "tokens": int(sel.sum()),
                        "predicted": int((~ctx.astype(bool)).sum()), "text": "".join(parts)})
    return records


def split_counts(dataset: PackedDataset) -> dict:
    """Rows, records, tokens and predicted tokens per objective (lm, mlm), and fill: from meta.json when `data pack`
    wrote them, else from the arrays (one pass, in chunks)."""
    meta = dataset.meta
    if "objectives" in meta and "tokens" in meta:
        objectives, tokens = {k: dict(v) for k, v in meta["objectives"].items()}, int(meta["tokens"])
    else:
        objectives, tokens = objective_counts(dataset)
    per_task = {name: c["records"] for name, c in objectives.items()}
    capacity = len(dataset) * dataset.max_length
    return {"rows": len(dataset), "max_length": dataset.max_length, "records": sum(per_task.values()),
            "records_per_task": per_task, "objectives": objectives, "tokens": tokens,
            "target_tokens": int(meta.get("target_tokens", 0)), "fill": tokens / capacity if capacity else 0.0,
            "vocab_size": dataset.vocab_size, "vocab_md5": meta.get("vocab_md5")}


def objective_counts(dataset: PackedDataset) -> tuple[dict, int]:
    """Records, tokens and predicted tokens per objective, and all tokens, counted from the rows themselves."""
    task, span, context = (dataset.arrays[k] for k in ("task", "span", "context"))
    objectives = {name: {"records": 0, "tokens": 0, "predicted": 0} for name in TASK_NAMES.values()}
    tokens = 0
    for start in range(0, len(dataset), 4096):
        t, s = np.asarray(task[start : start + 4096]), np.asarray(span[start : start + 4096])
        c = np.asarray(context[start : start + 4096])
        tokens += int((t >= 0).sum())
        first = np.ones_like(s, dtype=bool)
        first[:, 1:] = s[:, 1:] != s[:, :-1]  # the first token of each span starts a record
        for value, name in TASK_NAMES.items():
            mine = t == value
            objectives[name]["records"] += int((first & mine).sum())
            objectives[name]["tokens"] += int(mine.sum())
            objectives[name]["predicted"] += int((mine & (c == 0)).sum())
    return objectives, tokens


def inspect_splits(path: str | Path, vocab: str | Path | None = None, rows: int = 2) -> dict[str, dict]:
    """Counts and a few decoded records of each split under `path`."""
    path = Path(path)
    splits = split_dirs(path)
    if vocab is None:
        candidates = [path / "vocab.txt", path.parent / "vocab.txt"]
        vocab = next((c for c in candidates if c.exists()), None)
        if vocab is None:
            raise CpmctlError(f"{path}: no vocab.txt beside the packed data; pass --vocab")
    tokenizer = CPMAntTokenizer(vocab)
    result = {}
    for name, split in splits.items():
        dataset = PackedDataset(split)
        dataset.check_vocab(tokenizer.vocab_size, "vocab file")
        md5 = dataset.meta.get("vocab_md5")
        if md5 and md5 != hashlib.md5(Path(vocab).read_bytes()).hexdigest():
            raise CpmctlError(f"{split}: packed with another vocabulary (md5 {md5}) than {vocab}")
        info = {"path": str(split), **split_counts(dataset), "samples": []}
        for row in range(min(rows, len(dataset))):
            for record in decode_records(dataset, row, tokenizer):
                info["samples"].append({"row": row, **record})
        result[name] = info
    return result
