"""The dedup store: one SQLite database file (docs/formats.md, "Dedup store").

Tables
  meta(key, value)      format, version, hash, threshold, normalize, paragraphs (row count kept up to date)
  paragraphs(hash)      signed 64-bit xxh3_64 of each paragraph ever added (the rowid: compact and indexed)
  recent(hash)          unmerged paragraphs of earlier runs as stores before 2026-12 kept them (now only read and
                        emptied), merged into `paragraphs` in sorted bulk with `pending` when both hold
                        merge_rows() (MERGE_ROWS, or 1/4 of the store when more: a merge rewrites the table, so it
                        comes once per 1/4 of growth; random-key inserts a chunk at a time into a large B-tree
                        would rewrite a page per key)
  pending(id, hashes)   the paragraphs added since the last merge: per committed chunk one sorted int64 blob (an
                        append, not a B-tree insert per key; kept as they are when a run ends), read back into
                        memory by the next run. A paragraph is in the store when it is in any of the three
  inputs(...)           one row per input file a run has started: path, size, mtime, lines done, complete
  batches(...)          per committed chunk of an input: its line range, a fingerprint of its bytes, one decision
                        byte per line and its paragraph count, so a rerun reproduces earlier decisions exactly

In front sits a membership filter (data/membership.py, saved beside the store as STORE.membership, rebuilt when
missing, stale or damaged): a paragraph it does not know is new without a query. `pending` is held in memory as
sorted int64 runs (membership.HashRuns, 8 bytes a paragraph, at most 1/4 of the store), so SQLite sees only the
filter's other positives, looked up in sorted batches. Memory: at most ~5 bytes per stored paragraph (filter 1.5-3,
runs at most 2) beside SQLite's fixed page cache.

Each chunk's paragraphs, decisions and progress are committed in one transaction, so a killed run loses at most
the chunk in flight. WAL journaling with synchronous=NORMAL survives a killed process. One run at a time holds the
store (an exclusive lock file).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.membership import HashRuns, MembershipFilter, distinct_sorted
from cpmctl.data.store_schema import (  # noqa: F401 - FORMAT, VERSION, HASH: the store's identity, imported from here
    DEFAULT_THRESHOLD, FORMAT, HASH, VERSION, DedupSettings, check_settings, configure, create, inspect_file,
    table_names, upgrade,
)
from cpmctl.outputs import lock

CACHE_MB = 128  # SQLite page cache: the bound on the store's memory, whatever its size
_IN_BATCH = 256  # host parameters per SELECT ... IN: one fixed size, so the prepared statement is reused


# 4M unmerged paragraphs (32 MB of runs in memory) before the first merge: a 1000 MB run from an empty store
# merges none instead of twice, and its duplicates of its own paragraphs are found in memory, not in the B-tree.
MERGE_ROWS = 4_000_000
MERGE_SHARE = 4  # merge once `recent` + `pending` hold 1/MERGE_SHARE of the store (when that exceeds MERGE_ROWS)
_PARAMS = ",".join(f"?{i + 1}" for i in range(_IN_BATCH))
_LOOKUP_SQL = (f"SELECT hash FROM paragraphs WHERE hash IN ({_PARAMS}) "
               f"UNION ALL SELECT hash FROM recent WHERE hash IN ({_PARAMS})")


def membership_path(store: Path) -> Path:
    return store.with_name(store.name + ".membership")
@dataclass
class InputRecord:
    id: int
    path: str
    lines: int
    complete: bool


class DedupStore:
    def __init__(self, path: Path, conn: sqlite3.Connection, lock, settings, warn: Callable[[str], None] | None = None):
        self.path, self.conn, self._lock, self.settings = path, conn, lock, settings
        self.paragraph_count = int(self._meta().get("paragraphs", 0))
        self.last_inserted = 0
        self.recent_rows = conn.execute(
            "SELECT (SELECT count(*) FROM recent) + (SELECT coalesce(sum(length(hashes)), 0) / 8 FROM pending)").fetchone()[0]
        self.warn = warn
        self._membership: MembershipFilter | None = None  # loaded or built on first use
        self._recent: HashRuns | None = None  # the hashes of `pending`, in memory
        self._dirty = False  # the filter in memory is newer than its sidecar
        self.expected_new = 0  # the caller's estimate of the paragraphs this run will still add: sizes a rebuild

    # ----- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, threshold: float | None = None, normalize: bool | None = None,
             cache_mb: int = CACHE_MB, warn: Callable[[str], None] | None = None) -> "DedupStore":
        """Open or create the store. Settings not given are taken from the store (or the defaults for a new one);
        settings given must equal the recorded ones. An existing file is inspected read-only first, so a file that
        is refused (not SQLite, another program's database, other settings) is left exactly as it was; a bad
        setting creates nothing. One run at a time: the lock is keyed on the resolved path."""
        path = Path(path)
        if path.exists() and path.is_dir():
            raise CpmctlError(f"--store {path}: is a directory; name a .sqlite file")
        if threshold is not None:
            DedupSettings(threshold, bool(normalize)).validate()
        if path.exists() and path.stat().st_size > 0:
            inspect_file(path, threshold, normalize)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = lock(path, "--store", "`cpmctl data dedup` run", inside=False)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
            try:
                configure(conn, cache_mb)
                existing = table_names(conn)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise CpmctlError(f"--store {path}: not a usable SQLite database ({e}); is it the right file?") from None
            if existing and "meta" not in existing:
                raise CpmctlError(f"--store {path}: a SQLite database but not a cpmctl dedup store")
            if not existing:
                settings = DedupSettings(DEFAULT_THRESHOLD if threshold is None else threshold, bool(normalize))
                settings.validate()
                create(conn, settings)
            else:
                settings = check_settings(path, conn, threshold, normalize)
                upgrade(conn)
            return cls(path, conn, lock_fd, settings, warn)
        except BaseException:
            lock_fd.release()
            raise

    def close(self) -> None:
        try:
            self.save_membership()
        finally:
            self.conn.close()
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    # ----- paragraphs --------------------------------------------------------------------------------------
    def lookup(self, hashes) -> set[int]:
        """The subset of `hashes` (Python ints) already in the store."""
        return self.known(np.array(sorted(hashes), dtype=np.int64))

    def __contains__(self, h: int) -> bool:
        return bool(self.lookup([h]))

    def known(self, hashes: np.ndarray) -> set[int]:
        """The subset of `hashes` (an int64 array) already in the store."""
        return set(hashes[self.known_mask(hashes)].tolist())

    def known_mask(self, hashes: np.ndarray, ascending: bool = False) -> np.ndarray:
        """Per hash of `hashes` (an int64 array; `ascending` when already sorted, which makes the lookups several
        times faster): in the store, exactly. The membership filter clears most new ones, the in-memory runs
        answer for `pending`, SQLite (sorted, batched, `paragraphs` and `recent`) for the rest."""
        hashes = np.ascontiguousarray(hashes, dtype=np.int64)
        if not ascending:
            order = np.argsort(hashes, kind="stable")
            mask = np.empty(len(hashes), dtype=bool)
            mask[order] = self.known_mask(hashes[order], ascending=True)
            return mask
        mask = self.membership.maybe(hashes)
        at = np.flatnonzero(mask)
        if not len(at):
            return mask
        maybe = hashes[at]
        hit = self.recent.contains(maybe)
        rest = distinct_sorted(maybe[~hit]).tolist()
        found: list[int] = []
        for i in range(0, len(rest), _IN_BATCH):
            part = rest[i : i + _IN_BATCH]
            part += part[:1] * (_IN_BATCH - len(part))  # pad with a repeat: same statement text every time
            found.extend(row[0] for row in self.conn.execute(_LOOKUP_SQL, part))
        if found:
            hit |= np.isin(maybe, np.array(found, dtype=np.int64))
        mask[at] = hit
        return mask

    @property
    def recent(self) -> HashRuns:
        if self._recent is None:
            self._recent = HashRuns()
            for (blob,) in self.conn.execute("SELECT hashes FROM pending ORDER BY id"):
                self._recent.add(np.frombuffer(blob, dtype="<i8").astype(np.int64))
        return self._recent

    def merge_rows(self) -> int:
        return max(MERGE_ROWS, self.paragraph_count // MERGE_SHARE)

    # ----- the membership filter -----------------------------------------------------------------------------------
    @property
    def membership(self) -> MembershipFilter:
        if self._membership is None:
            record = json.loads(self._meta().get("membership", "{}"))
            sidecar = membership_path(self.path)
            found, why = MembershipFilter.load(sidecar, record.get("id", ""), self.paragraph_count) \
                if record else (None, "missing")
            if found is None:
                if self.warn is not None and self.paragraph_count:
                    what = "not there yet (a store of an earlier cpmctl)" if not record else why
                    self.warn(f"--store {self.path}: membership filter {sidecar.name} {what}; rebuilding it from the "
                              f"store's {self.paragraph_count:,} paragraphs")
                found = self.rebuild_membership()
            self._membership = found
        return self._membership

    def rebuild_membership(self) -> MembershipFilter:
        """A filter of every hash in the store, sized for twice as many as it will hold at the end of the run (so
        a growing store is rebuilt about once per run, not once per doubling)."""
        rows = self.conn.execute("SELECT hash FROM paragraphs UNION ALL SELECT hash FROM recent")
        built = MembershipFilter(2 * (self.paragraph_count + max(0, self.expected_new)))
        while batch := rows.fetchmany(1 << 16):
            built.add(np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch)))
        for (blob,) in self.conn.execute("SELECT hashes FROM pending"):
            built.add(np.frombuffer(blob, dtype="<i8").astype(np.int64))
        self._membership, self._dirty = built, True
        return built

    def save_membership(self) -> None:
        """Write the sidecar when it is behind, then record its identity in meta (a crash in between leaves a
        sidecar that does not match: rebuilt next time, never trusted)."""
        if self._membership is None or not self._dirty:
            return
        identity = os.urandom(8).hex()
        self._membership.save(membership_path(self.path), identity, self.paragraph_count)
        record = json.dumps({"id": identity, "paragraphs": self.paragraph_count})
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('membership', ?)", (record,))
        self._dirty = False

    def merge_recent(self) -> None:
        """Move `recent` and `pending` into `paragraphs` in key order: each B-tree page is rewritten once per merge,
        not once per key. One transaction, so a kill leaves either table state intact."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR IGNORE INTO paragraphs(hash) SELECT hash FROM recent ORDER BY hash")
            blobs = [np.frombuffer(b, dtype="<i8") for (b,) in conn.execute("SELECT hashes FROM pending")]
            if blobs:
                hashes = np.concatenate(blobs).astype(np.int64)
                hashes.sort()
                for i in range(0, len(hashes), 1 << 18):
                    _insert(conn, "paragraphs", hashes[i : i + (1 << 18)].tolist())
            conn.execute("DELETE FROM pending")
            conn.execute("DELETE FROM recent")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.recent_rows = 0
        if self._recent is not None:
            self._recent.clear()

    # ----- inputs and the decision journal ------------------------------------------------------------------
    def begin_input(self, path: Path) -> InputRecord:
        """The record of this input: a finished one with the same path, size and mtime (to replay), an
        unfinished one with the same path (to resume), or a new one."""
        key = str(path.resolve())
        st = path.stat()
        row = self.conn.execute(
            "SELECT id, lines FROM inputs WHERE path = ? AND size = ? AND mtime_ns = ? AND complete = 1 "
            "ORDER BY id DESC LIMIT 1", (key, st.st_size, st.st_mtime_ns)).fetchone()
        if row:
            return InputRecord(row[0], key, row[1], True)
        row = self.conn.execute(
            "SELECT id, lines FROM inputs WHERE path = ? AND complete = 0 ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        if row:
            return InputRecord(row[0], key, row[1], False)
        cur = self.conn.execute("INSERT INTO inputs(path, size, mtime_ns, started) VALUES (?, ?, ?, ?)",
                                (key, st.st_size, st.st_mtime_ns, time.time()))
        return InputRecord(cur.lastrowid, key, 0, False)

    def batches(self, input_id: int) -> list[tuple[int, int, int, bytes, int]]:
        """(first line, lines, fingerprint, codes, paragraphs) of an input's committed chunks, in order."""
        return [
            (r[0], r[1], r[2], bytes(r[3]), r[4])
            for r in self.conn.execute(
                "SELECT first_line, lines, fingerprint, codes, paragraphs FROM batches WHERE input = ? "
                "ORDER BY first_line", (input_id,))
        ]

    def commit_batch(self, record: InputRecord, first_line: int, lines: int, fingerprint: int, codes: bytes,
                     new_hashes: np.ndarray, paragraphs: int) -> None:
        """One transaction: the chunk's new paragraphs (sorted, distinct, none in the store yet: an int64 array), its
        decisions and the input's progress."""
        if first_line != record.lines:
            raise CpmctlError(f"{record.path}: chunk at line {first_line + 1} does not follow the {record.lines} "
                              "lines already committed")
        conn = self.conn
        # Into the filter first: a failed commit leaves it with extra hashes (harmless), never without one.
        new_hashes = np.ascontiguousarray(new_hashes, dtype=np.int64)
        self.membership.add(new_hashes)
        self._dirty = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            if len(new_hashes):
                conn.execute("INSERT INTO pending(hashes) VALUES (?)", (new_hashes.astype("<i8").tobytes(),))
            self.last_inserted = len(new_hashes)
            conn.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                         (record.id, first_line, lines, fingerprint, codes, paragraphs))
            conn.execute("UPDATE inputs SET lines = ? WHERE id = ?", (first_line + lines, record.id))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'paragraphs'",
                         (str(self.paragraph_count + self.last_inserted),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.paragraph_count += self.last_inserted
        self.recent_rows += self.last_inserted
        if self._recent is not None:
            self._recent.add(new_hashes, distinct_sorted=True)
        record.lines = first_line + lines
        if self.recent_rows >= self.merge_rows():
            self.merge_recent()
        if self.membership.full:
            self.rebuild_membership()

    def finish_input(self, record: InputRecord) -> None:
        if not record.complete:
            self.conn.execute("UPDATE inputs SET complete = 1, finished = ? WHERE id = ?", (time.time(), record.id))
            record.complete = True

    # ----- upkeep ------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Fold the write-ahead log into the main file, so a finished run leaves one self-contained file."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def info(self) -> dict:
        meta = self._meta()
        inputs = self.conn.execute("SELECT count(*), sum(complete), sum(lines) FROM inputs").fetchone()
        return {"store": str(self.path), "paragraphs": self.paragraph_count, "bytes": self.size_bytes(),
                "threshold": self.settings.threshold, "normalize": self.settings.normalize, "hash": meta.get("hash"),
                "inputs": inputs[0] or 0, "inputs_complete": inputs[1] or 0, "lines": inputs[2] or 0}


def _insert(conn: sqlite3.Connection, table: str, hashes: list[int]) -> None:
    """One statement for the whole batch: SQLite reads the integers from one JSON array (json_each, in SQLite
    since 3.38) at about twice the speed of binding them row by row."""
    if _JSON_EACH:
        conn.execute(f"INSERT OR IGNORE INTO {table}(hash) SELECT value FROM json_each(?)", (json.dumps(hashes),))
    else:
        conn.executemany(f"INSERT OR IGNORE INTO {table}(hash) VALUES (?)", ((h,) for h in hashes))


_JSON_EACH = sqlite3.sqlite_version_info >= (3, 38, 0)
