"""The worker side of `data dedup`: a block of input lines parsed, its paragraphs normalised (optionally) and
hashed, and the hashes sorted, so the one writer (data/dedup.py) only looks them up and decides. A paragraph is a
stripped, non-empty line of a document's text; its key is xxh3_64 of its UTF-8 bytes."""

from __future__ import annotations

import re
import unicodedata
from array import array
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import xxhash

from cpmctl.data.textio import Block, document_texts

# One byte per input line in the journal (the writer's decisions too).
KEPT, DUPLICATE, EMPTY, MALFORMED, BLANK = b"k"[0], b"d"[0], b"e"[0], b"m"[0], b"b"[0]
_HAS_PARAGRAPHS = b"p"[0]
_NOT_WORD = re.compile(r"[\W_]+")


def normalize_paragraph(text: str) -> str:
    """Optional normalisation: NFKC, case-folded, whitespace, punctuation and symbols removed."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


@dataclass
class HashedChunk:
    status: bytearray  # per line: p (has paragraphs), e (empty), m (malformed), b (blank jsonl line)
    counts: array  # distinct hashes per "p" line
    hashes: array  # signed 64-bit hashes, concatenated
    paragraphs: int = 0
    malformed: list = field(default_factory=list)  # (line offset in chunk, reason)
    fingerprint: int = 0  # of the chunk's raw bytes, for the journal
    ends: array = field(default_factory=lambda: array("q"))  # per line: the offset just past its newline
    order: bytes = b""  # int64 positions that sort `hashes` (stable): sorted by the worker, not the one writer
    copy: bytes = b""  # per hash, bool: an earlier document of the chunk holds the same hash
    has_cr: bool = False  # a carriage return in the block's bytes (its kept lines are then written one by one)


_worker_settings: tuple[str, bool] = ("jsonl", False)


def _init_worker(fmt: str, normalize: bool) -> None:
    global _worker_settings
    _worker_settings = (fmt, normalize)


def hash_lines(block: Block) -> HashedChunk:
    fmt, normalize = _worker_settings
    block.load()
    lines = block.split()
    status, counts, unsigned = bytearray(len(lines)), array("I"), array("Q")
    chunk = HashedChunk(status, counts, unsigned)
    h64, strip, encode = xxhash.xxh3_64_intdigest, str.strip, str.encode
    for i, text in enumerate(document_texts(lines, fmt)):
        if text.__class__ is not str:
            if text is None:
                status[i] = BLANK
            else:
                status[i] = MALFORMED
                chunk.malformed.append((i, str(text)))
            continue
        paras = list(filter(None, map(strip, text.split("\n"))))  # the stripped, non-empty paragraphs
        if not paras:
            status[i] = EMPTY
            continue
        chunk.paragraphs += len(paras)
        if normalize:
            paras = [n for n in map(normalize_paragraph, paras) if n] or paras
        distinct = set(map(h64, map(encode, paras)))  # of their UTF-8 bytes
        status[i] = _HAS_PARAGRAPHS
        counts.append(len(distinct))
        unsigned.extend(distinct)
    # SQLite integers are signed 64-bit: reinterpret the same bits.
    chunk.hashes = array("q", unsigned.tobytes())
    sort_copies(chunk)
    chunk.ends = array("q", accumulate(len(line) + 1 for line in lines))
    chunk.fingerprint = xxhash.xxh3_64_intdigest(block.data) - (1 << 63)  # = _fingerprint of its lines
    chunk.has_cr = b"\r" in block.data
    return chunk


def sort_copies(chunk: HashedChunk) -> None:
    """The chunk's sort order and repeated hashes (the part of the decisions that needs no store), filled in."""
    hashes = np.frombuffer(chunk.hashes, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")  # copies of a hash in document order (distinct within a document)
    copy = np.zeros(len(hashes), dtype=bool)
    copy[order[1:]] = hashes[order[1:]] == hashes[order[:-1]]
    chunk.order, chunk.copy = order.astype(np.int64).tobytes(), copy.tobytes()
