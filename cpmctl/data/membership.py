"""The dedup store's membership filter: a blocked Bloom filter over its paragraph hashes, in memory during a run
and in a sidecar file beside the store between runs (docs/formats.md, "Dedup store").

A paragraph hash (already a uniform 64-bit xxh3) picks one 64-bit word and sets HASHES bits in it; a hash whose
bits are not all set was never added, so a paragraph the filter does not know is new without asking SQLite.
A hash whose bits are all set may still be new (measured: 0.1% of new paragraphs when the filter is half full,
1% when full): the store is asked about those. The filter is sized for twice the paragraphs it holds and rebuilt
from the store, twice as large, when it fills up, so it costs 1.5 to 2 * BITS_PER_KEY / 8 = 3 bytes per stored
paragraph.

Sidecar layout: one JSON header line (format, version, words, keys, the store's identity and paragraph count at
save time, an xxh3_64 of the words), then the words as little-endian uint64. The store's meta row `membership`
names the same identity and count: a sidecar that does not match it exactly (missing, damaged, older than the
store's last write, another store's) is not used, and the store rebuilds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xxhash

from cpmctl.io import make_temp

FORMAT = "cpmctl-dedup-membership"
VERSION = 1
BITS_PER_KEY = 12
HASHES = 6
MIN_KEYS = 1 << 20
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SIX = np.uint64(63)


class MembershipFilter:
    def __init__(self, capacity: int, words: np.ndarray | None = None, keys: int = 0):
        n = max(1, -(-max(capacity, MIN_KEYS) * BITS_PER_KEY // 64))
        self.words = np.zeros(n, dtype=np.uint64) if words is None else words
        self.keys = keys  # hashes added (with repeats: an upper bound on distinct ones)

    @property
    def capacity(self) -> int:
        return len(self.words) * 64 // BITS_PER_KEY

    @property
    def full(self) -> bool:
        return self.keys > self.capacity

    def _slots(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = hashes.view(np.uint64)
        index = ((u * _MIX) >> np.uint64(32)) % np.uint64(len(self.words))
        mask = np.zeros(len(u), dtype=np.uint64)
        for j in range(HASHES):
            mask |= np.uint64(1) << ((u >> np.uint64(6 * j)) & _SIX)
        return index.astype(np.int64), mask

    def add(self, hashes: np.ndarray) -> None:
        """Add signed 64-bit paragraph hashes (an int64 array)."""
        if len(hashes):
            index, mask = self._slots(np.ascontiguousarray(hashes, dtype=np.int64))
            np.bitwise_or.at(self.words, index, mask)
            self.keys += len(hashes)

    def maybe(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash: False = certainly never added; True = perhaps added."""
        index, mask = self._slots(np.ascontiguousarray(hashes, dtype=np.int64))
        return (self.words[index] & mask) == mask

    # ----- the sidecar ---------------------------------------------------------------------------------------------
    def save(self, path: Path, identity: str, paragraphs: int) -> None:
        """Atomically: a temp file beside `path`, flushed, renamed into place."""
        words = self.words.astype("<u8", copy=False)  # no copy on a little-endian machine: the file is that memory
        header = {"format": FORMAT, "version": VERSION, "words": len(self.words), "keys": self.keys,
                  "bits_per_key": BITS_PER_KEY, "hashes": HASHES, "store": identity, "paragraphs": paragraphs,
                  "xxh3_64": xxhash.xxh3_64_hexdigest(memoryview(words).cast("B"))}
        tmp = make_temp(path)
        try:
            with open(tmp, "wb") as f:
                f.write((json.dumps(header) + "\n").encode())
                f.write(memoryview(words).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, identity: str, paragraphs: int) -> tuple["MembershipFilter | None", str | None]:
        """(the filter, None) when `path` holds the filter of this store at exactly `paragraphs` paragraphs, else
        (None, why not): "missing", or what is wrong with it."""
        try:
            with open(path, "rb") as f:
                line = f.readline(4096)
                body = bytearray(max(0, os.fstat(f.fileno()).st_size - len(line)))  # read in place: no copy
                got = f.readinto(body)
                if got != len(body):  # a file that shrank meanwhile: its check below fails
                    body = body[:got]
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            return None, f"unreadable ({e.strerror})"
        try:
            header = json.loads(line)
            if header.get("format") != FORMAT:
                return None, f"not a membership filter (format {header.get('format')!r})"
            if header.get("version") != VERSION or header.get("bits_per_key") != BITS_PER_KEY \
                    or header.get("hashes") != HASHES:
                return None, f"written by another cpmctl (version {header.get('version')})"
            if header.get("store") != identity:
                return None, "belongs to another store or an earlier state of it"
            if header.get("paragraphs") != paragraphs:
                return None, (f"stale: saved at {header.get('paragraphs')} paragraphs, the store holds {paragraphs} "
                              "(a run was interrupted, or another program wrote the store)")
            n = int(header["words"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None, "damaged (unreadable header)"
        if len(body) != 8 * n or xxhash.xxh3_64_hexdigest(body) != header.get("xxh3_64"):
            return None, "damaged (its bits do not match their checksum)"
        return cls(0, np.frombuffer(body, dtype="<u8").astype(np.uint64, copy=False), int(header.get("keys", 0))), None


def distinct_sorted(ascending: np.ndarray) -> np.ndarray:
    """np.unique of an already sorted array, in one pass."""
    if len(ascending) < 2:
        return ascending
    return ascending[np.concatenate(([True], ascending[1:] != ascending[:-1]))]


class HashRuns:
    """An exact set of int64 hashes held as a few sorted arrays (8 bytes a hash, where a Python set costs ~70):
    the store's paragraphs not yet merged into its main table. A sorted batch is added as a run and merged with
    the runs not twice its size, so the run sizes at least halve from the first to the last (log2(n) runs) and a
    hash is copied O(log n) times; a lookup binary-searches every run."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def add(self, hashes: np.ndarray, distinct_sorted: bool = False) -> None:
        run = np.asarray(hashes, dtype=np.int64) if distinct_sorted else np.unique(np.asarray(hashes, dtype=np.int64))
        while self.runs and len(self.runs[-1]) < 2 * len(run):
            run = np.concatenate((self.runs.pop(), run))
            run.sort(kind="stable")  # two sorted runs: timsort merges them in one linear pass
        if len(run):
            self.runs.append(run)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[at] == hashes
        return found

    def clear(self) -> None:
        self.runs = []
