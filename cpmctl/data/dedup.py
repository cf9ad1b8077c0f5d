"""Paragraph-hash deduplication against a persistent store (shared/reference/cpm-ant.md section 11).

A paragraph is a stripped, non-empty line of a document's text; its key is xxh3_64 of its UTF-8 bytes (of its
normalised form with `normalize`). A document whose share of distinct paragraph hashes already in the store is
>= threshold is a duplicate; otherwise all its hashes are added. Documents are decided one by one in input order,
so the result is deterministic whatever `--workers` is: workers only parse and hash (one pool for all inputs,
blocks of raw bytes in, compact hash arrays out), the one writer decides. Lookups go through the store's
membership filter first (data/store.py `known`), so most new paragraphs never reach SQLite.

Resumability: every chunk of input lines is committed in one SQLite transaction together with its decisions (one
byte per line) and a fingerprint of its bytes. A rerun replays the journalled decisions, verifying the
fingerprints, and continues where the last commit ended; a finished input rerun unchanged is replayed entirely
(same output, store untouched). The output is rewritten from the start on every run and renamed into place only
when complete. See docs/formats.md, "Dedup store".
"""

from __future__ import annotations

import os
import sqlite3
import time
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from cpmctl import CpmctlError
import numpy as np

from cpmctl.data.input_file import InputFile
from cpmctl.data.membership import distinct_sorted
from cpmctl.data.paragraph_hash import (
    _HAS_PARAGRAPHS, BLANK, DUPLICATE, EMPTY, KEPT, MALFORMED, HashedChunk, _init_worker, hash_lines, sort_copies,
)
from cpmctl.data.parallel import InOrder, ordered_map
from cpmctl.data.store import CACHE_MB, DedupStore, InputRecord
from cpmctl.data.textio import (
    DEFAULT_CHUNK_BYTES,
    Block,
    DocumentWriter,
    LineErrors,
    OutputSpec,
    Shard,
    as_output_line,
    changed_error,
    check_readable,
    claim_output,
    input_bytes,
    read_blocks,
    read_chunks,
)


def required_seen(threshold: float, n: int) -> int:
    """The number of already-seen paragraphs (of n) that makes a duplicate: ceil(threshold * n), exact at the
    boundary (7 of 10 at 0.7 is a duplicate) despite binary floating point."""
    need = threshold * n
    whole = round(need)
    return whole if abs(need - whole) < 1e-9 else int(need) + 1


# ----- writer side: decide in order --------------------------------------------------------------------------
@dataclass
class DedupResult:
    files: int = 0
    documents: int = 0
    kept: int = 0
    duplicates: int = 0
    empty: int = 0
    malformed: int = 0
    replayed: int = 0  # documents decided by an earlier run and reproduced from the journal
    paragraphs: int = 0
    new_paragraphs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    store_paragraphs: int = 0
    store_bytes: int = 0
    output: str = ""
    threshold: float = 0.7
    normalize: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        d["seconds"] = round(self.seconds, 3)
        return d

    def count_all(self, codes: bytes) -> None:
        """count() of every code, at C speed."""
        self.kept += codes.count(KEPT)
        self.duplicates += codes.count(DUPLICATE)
        self.empty += codes.count(EMPTY)
        malformed = codes.count(MALFORMED)
        self.malformed += malformed
        self.documents += len(codes) - malformed - codes.count(BLANK)

    def count(self, code: int) -> None:
        if code == KEPT:
            self.kept += 1
        elif code == DUPLICATE:
            self.duplicates += 1
        elif code == EMPTY:
            self.empty += 1
        elif code == MALFORMED:
            self.malformed += 1
        if code != BLANK and code != MALFORMED:
            self.documents += 1


def decide(chunk: HashedChunk, store: DedupStore, threshold: float) -> tuple[bytearray, np.ndarray]:
    """Per-line decisions and the hashes to add (sorted, distinct), exactly as if documents were checked and
    added one by one. Vectorised: a document is certain when the store alone makes it a duplicate, or when even
    every earlier copy in this chunk counting as added cannot; only the rest (a paragraph repeated inside the
    chunk tipping the balance) are decided one by one, in order, against the earlier decisions."""
    hashes = np.frombuffer(chunk.hashes, dtype=np.int64)
    counts = np.frombuffer(chunk.counts, dtype=np.uint32).astype(np.int64)
    doc = np.repeat(np.arange(len(counts)), counts)
    if len(chunk.order) != 8 * len(hashes):
        sort_copies(chunk)
    order = np.frombuffer(chunk.order, dtype=np.int64)
    copy = np.frombuffer(chunk.copy, dtype=bool)
    in_order = hashes[order]
    known = np.empty(len(hashes), dtype=bool)
    known[order] = store.known_mask(in_order, ascending=True)  # sorted lookups: cache-friendly binary searches
    need = _required(threshold, counts)
    low = np.bincount(doc, weights=known, minlength=len(counts))
    kept = np.bincount(doc, weights=known | copy, minlength=len(counts)) < need
    unsure = np.flatnonzero(~kept & (low < need))
    if len(unsure):
        _decide_in_order(unsure, kept, hashes, doc, known, copy, order, low, need)
    codes = bytearray(chunk.status)
    view = np.frombuffer(codes, dtype=np.uint8)
    view[view == _HAS_PARAGRAPHS] = np.where(kept, KEPT, DUPLICATE)
    return codes, distinct_sorted(in_order[(kept[doc] & ~known)[order]])


def _required(threshold: float, n: np.ndarray) -> np.ndarray:
    """required_seen for each of `n`, with the same float arithmetic."""
    need = threshold * n.astype(np.float64)
    whole = np.round(need)
    return np.where(np.abs(need - whole) < 1e-9, whole, np.floor(need) + 1)


def _decide_in_order(unsure, kept, hashes, doc, known, copy, order, low, need) -> None:
    """The documents `unsure` decided one by one: a copied paragraph counts when an earlier kept document of
    this chunk holds it."""
    n = len(hashes)
    place = np.empty(n, dtype=np.int64)
    place[order] = np.arange(n)  # where each hash lies in sorted order
    run_start = np.maximum.accumulate(np.where(copy[order], 0, np.arange(n)))  # its first copy, there
    first = run_start[place]  # where each hash's copies start in `order`
    starts = np.concatenate(([0], np.cumsum(np.bincount(doc, minlength=len(kept)))))
    for d in unsure.tolist():
        seen = low[d]
        for i in range(starts[d], starts[d + 1]):
            if copy[i] and not known[i]:
                j = first[i]
                while order[j] != i:  # earlier copies of this hash, in document order
                    if kept[doc[order[j]]]:
                        seen += 1
                        break
                    j += 1
        kept[d] = seen < need[d]


def write_kept(writer: DocumentWriter, data: bytes | memoryview, has_cr: bool, ends: array, codes: bytearray) -> None:
    """The kept lines of a block (`data`: its bytes, or a view of them read back) to `writer` as
    as_output_line would give them: runs of kept lines as slices, in one write (line by line only for a block
    with carriage returns)."""
    if has_cr:
        for line, code in zip(Block(0, 0, 0, bytes(data)).split(), codes):
            if code == KEPT:
                writer.write(as_output_line(line))
        return
    keep = np.frombuffer(bytes(codes), dtype=np.uint8) == KEPT
    if not keep.any():
        return
    end = np.frombuffer(ends, dtype=np.int64)
    start = np.concatenate(([0], end[:-1]))
    edges = np.diff(np.concatenate(([0], keep.view(np.int8), [0])))
    firsts, lasts = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    out = b"".join([data[a:b] for a, b in zip(start[firsts].tolist(), end[lasts].tolist())])
    if not out.endswith(b"\n"):  # the input's last line had no newline
        out += b"\n"
    writer.write_many(out, np.cumsum(end[keep] - start[keep]))


def _fingerprint(lines: list[bytes]) -> int:
    h = xxhash.xxh3_64()
    for line in lines:
        h.update(line)
    return h.intdigest() - (1 << 63)  # fits a signed SQLite integer


class _Replay:
    """Reproduces the journalled decisions of an input line by line, checking each batch's fingerprint."""

    def __init__(self, store: DedupStore, record: InputRecord, shard: Shard):
        self.batches = deque(store.batches(record.id))
        self.shard = shard

    def run(self, first: int, lines: list[bytes], writer: DocumentWriter, result: DedupResult) -> None:
        """`lines` are whole journal batches starting at line `first`."""
        for batch_first, count, fingerprint, codes, paragraphs in self.batches_covering(first, len(lines)):
            part = lines[batch_first - first : batch_first - first + count]
            if _fingerprint(part) != fingerprint:
                raise CpmctlError(
                    f"{self.shard.path}: lines {batch_first + 1}-{batch_first + count} differ from the version a "
                    "previous run deduplicated into this store; restore that file, or give the new data another name"
                )
            for line, code in zip(part, codes):
                result.count(code)
                if code == KEPT:
                    writer.write(as_output_line(line))
                result.replayed += code in (KEPT, DUPLICATE, EMPTY)
            result.paragraphs += paragraphs

    def batches_covering(self, first: int, n: int):
        while self.batches and self.batches[0][0] < first + n:
            b = self.batches[0]
            if b[0] < first or b[0] + b[1] > first + n:
                raise AssertionError("replay chunks must align with journal batches")
            self.batches.popleft()
            yield b


def _aligned_chunks(shard: Shard, chunk_bytes: int, boundaries: list[int]):
    """(first line, lines, replayed) chunks: the replayed part cut exactly at the journal's batch ends
    (`boundaries`), the rest as read."""
    pending: list[bytes] = []
    start = 0
    cuts = list(boundaries)
    for first, lines in read_chunks(shard, chunk_bytes):
        if not pending:
            start = first
        pending.extend(lines)
        while cuts and start + len(pending) >= cuts[0]:
            k = cuts.pop(0) - start
            yield start, pending[:k], True
            pending, start = pending[k:], start + k
        if not cuts and pending:
            yield start, pending, False
            pending = []
    if cuts:
        raise CpmctlError(
            f"{shard.path}: has {start + len(pending)} lines but a previous run deduplicated {cuts[-1]} of them "
            "into this store; restore that file, or give the new data another name"
        )


def dedup(
    shards: list[Shard],
    output: OutputSpec,
    store_path: str | Path,
    threshold: float | None = None,
    normalize: bool | None = None,
    workers: int = 1,
    strict: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = 512 << 20,
    on_progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    cache_mb: int = CACHE_MB,
    force: bool = False,
) -> DedupResult:
    """Deduplicate `shards` into `output` against the store at `store_path` (created if missing). The output
    follows the output policy (cpmctl/outputs.py); neither it nor the store may be an input."""
    inputs = [s.path for s in shards]
    for shard in shards:
        if os.path.exists(store_path) and os.path.samefile(shard.path, store_path):
            raise CpmctlError(f"--store {store_path}: is also the input {shard.path}")
    claimed = claim_output(output, "data dedup", inputs + [store_path], force)
    check_readable(shards)
    start = time.perf_counter()
    errors = LineErrors(strict, warn)
    with DedupStore.open(store_path, threshold, normalize, cache_mb, warn) as store:
        settings = store.settings
        result = DedupResult(files=len(shards), output=str(output.path), threshold=settings.threshold,
                             normalize=settings.normalize)
        with DocumentWriter(output, shard_bytes, claimed) as writer:
            try:
                _dedup_all(shards, store, writer, result, errors, workers, chunk_bytes, on_progress)
            except sqlite3.OperationalError as e:
                if "full" not in str(e):
                    raise
                raise CpmctlError(f"--store {store_path}: disk full while writing it ({e}); every chunk committed "
                                  "before is kept: free some space and rerun to resume") from None
            store.checkpoint()
            store.save_membership()
            result.store_paragraphs = store.paragraph_count
            result.store_bytes = store.size_bytes()
            result.seconds = time.perf_counter() - start
            writer.close(**{"command": "dedup", "store": str(store_path), **result.to_dict()})
    return result


def _work(shards: list[Shard], store: DedupStore, records: dict, inputs: dict, result: DedupResult, chunk_bytes: int,
          on_progress):
    """The stream for all inputs: Blocks to hash in the workers, and InOrder items the writer handles itself
    in their place: ("replay", shard, first, lines, replay), ("end", shard, record). Fills `records`, and `inputs`
    with the InputFile of each uncompressed input read fresh (its blocks carry no bytes: see _decide_all)."""
    for index, shard in enumerate(shards):
        record = records[index] = store.begin_input(shard.path)
        replay = _Replay(store, record, shard)
        cuts = [first + count for first, count, *_ in replay.batches]
        if cuts:
            for first, lines, replayed in _aligned_chunks(shard, chunk_bytes, cuts):
                if replayed:
                    yield InOrder(("replay", index, first, lines, replay))
                else:
                    data = b"".join(lines)
                    yield _counted(Block(index, first, len(lines), data), result, on_progress)
        elif shard.compression:
            for block in read_blocks(shard, index, chunk_bytes):
                yield _counted(block, result, on_progress)
        else:
            try:
                inputs[index] = source = InputFile(shard)
            except OSError as e:
                raise CpmctlError(f"{shard.path}: unreadable ({e.strerror})") from None
            for block in source.blocks(index, chunk_bytes):
                yield _counted(block, result, on_progress)
        yield InOrder(("end", index, record))


def _counted(block: Block, result: DedupResult, on_progress) -> Block:
    result.bytes += block.size
    if on_progress:
        on_progress(block.size)
    return block


def _dedup_all(shards, store, writer, result, errors, workers, chunk_bytes, on_progress) -> None:
    records: dict[int, InputRecord] = {}
    inputs: dict[int, InputFile] = {}
    try:
        _decide_all(shards, store, writer, result, errors, workers, chunk_bytes, on_progress, records, inputs)
    finally:
        for source in inputs.values():
            source.close()


def _decide_all(shards, store, writer, result, errors, workers, chunk_bytes, on_progress, records, inputs) -> None:
    total = input_bytes(shards) or 0  # compressed inputs: no projection, the filter grows by doubling
    decided = 0  # bytes of the blocks decided so far
    next_line: dict[int, int] = {}  # per InputFile: the first line of its next block
    stream = _work(shards, store, records, inputs, result, chunk_bytes, on_progress)
    settings = (shards[0].format, store.settings.normalize)
    for item, hashed in ordered_map(hash_lines, stream, workers, _init_worker, settings):
        if isinstance(item, InOrder):
            kind, index, *rest = item.value
            if kind == "replay":
                first, lines, replay = rest
                nbytes = sum(map(len, lines))
                result.bytes += nbytes
                replay.run(first, lines, writer, result)
                if on_progress:
                    on_progress(nbytes)
            else:
                store.finish_input(rest[0])
                if index in inputs:
                    inputs.pop(index).close()
            continue
        shard = shards[item.shard]
        record = records[item.shard]
        if item.first < 0:  # an InputFile block: its place comes from the line counts of the blocks before it
            item.first, item.lines = next_line.get(item.shard, 0), len(hashed.status)
            next_line[item.shard] = item.first + item.lines
        data = item.data
        if data is None:  # hashed by a worker from its own read: written from the same bytes or not at all
            _, offset, size, _ = item.source
            data = inputs[item.shard].read(offset, size)
            if xxhash.xxh3_64_intdigest(data) - (1 << 63) != hashed.fingerprint:
                raise CpmctlError(changed_error(shard.path, offset, size))
        for offset_in, reason in hashed.malformed:
            errors(shard.path, item.first + offset_in, reason)
        codes, new_hashes = decide(hashed, store, store.settings.threshold)
        store.commit_batch(record, item.first, item.lines, hashed.fingerprint, bytes(codes), new_hashes,
                           hashed.paragraphs)
        result.count_all(codes)
        write_kept(writer, data, hashed.has_cr, hashed.ends, codes)
        result.paragraphs += hashed.paragraphs
        result.new_paragraphs += store.last_inserted
        decided += item.size
        # This run's rate of new paragraphs per decided byte, projected over the input not read yet (replayed parts
        # count as read).
        store.expected_new = result.new_paragraphs * max(0, total - result.bytes) // max(1, decided)
