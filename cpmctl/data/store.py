"""The dedup store: one SQLite database file (docs/formats.md, "Dedup store").

Tables
  meta(key, value)      format, version, hash, threshold, normalize, paragraphs (row count kept up to date)
  paragraphs(hash)      signed 64-bit xxh3_64 of each paragraph ever added (the rowid: compact and indexed)
  recent(hash)          paragraphs added since the last merge; merged into `paragraphs` in sorted bulk when it
                        holds MERGE_ROWS, because inserting random keys one chunk at a time into a large B-tree
                        rewrites a page per key (a paragraph is in the store when it is in either table)
  inputs(...)           one row per input file a run has started: path, size, mtime, lines done, complete
  batches(...)          per committed chunk of an input: its line range, a fingerprint of its bytes, one decision
                        byte per line and its paragraph count, so a rerun reproduces earlier decisions exactly

In front of the tables sits a membership filter (data/membership.py, saved beside the store as STORE.membership,
rebuilt from the tables when missing, stale or damaged): a paragraph it does not know is new without a query. The
paragraphs of `recent` are also held in memory (at most MERGE_ROWS of them), so what remains for SQLite is the
filter's positives that are not recent, looked up in sorted batches.

Each chunk's paragraphs, decisions and progress are committed in one transaction, so a killed run loses at most
the chunk in flight. WAL journaling with synchronous=NORMAL survives a killed process; the page cache is fixed,
so memory stays flat however large the store grows. One run at a time holds the store (an exclusive lock file).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.membership import MembershipFilter
from cpmctl.outputs import lock

FORMAT = "cpmctl-dedup"
VERSION = 1
HASH = "xxh3_64"
DEFAULT_THRESHOLD = 0.7
CACHE_MB = 128  # SQLite page cache: the bound on the store's memory, whatever its size
_IN_BATCH = 256  # host parameters per SELECT ... IN: one fixed size, so the prepared statement is reused


@dataclass(frozen=True)
class DedupSettings:
    threshold: float = DEFAULT_THRESHOLD
    normalize: bool = False

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise CpmctlError(f"--threshold must be in (0, 1], got {self.threshold}")


MERGE_ROWS = 1_000_000
_PARAMS = ",".join(f"?{i + 1}" for i in range(_IN_BATCH))
_LOOKUP_SQL = (f"SELECT hash FROM paragraphs WHERE hash IN ({_PARAMS}) "
               f"UNION ALL SELECT hash FROM recent WHERE hash IN ({_PARAMS})")
_LOOKUP_MAIN_SQL = f"SELECT hash FROM paragraphs WHERE hash IN ({_PARAMS})"


def membership_path(store: Path) -> Path:
    return store.with_name(store.name + ".membership")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS paragraphs (hash INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS recent (hash INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    lines INTEGER NOT NULL DEFAULT 0, complete INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL
);
CREATE INDEX IF NOT EXISTS inputs_by_path ON inputs(path);
CREATE TABLE IF NOT EXISTS batches (
    input INTEGER NOT NULL, first_line INTEGER NOT NULL, lines INTEGER NOT NULL, fingerprint INTEGER NOT NULL,
    codes BLOB NOT NULL, paragraphs INTEGER NOT NULL, PRIMARY KEY (input, first_line)
) WITHOUT ROWID;
"""


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
        self.recent_rows = conn.execute("SELECT count(*) FROM recent").fetchone()[0]
        self.warn = warn
        self._membership: MembershipFilter | None = None  # loaded or built on first use
        self._recent: set[int] | None = None  # the hashes of `recent`, in memory
        self._dirty = False  # the filter in memory is newer than its sidecar

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
            _inspect(path, threshold, normalize)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = lock(path, "--store", "`cpmctl data dedup` run", inside=False)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
            try:
                _configure(conn, cache_mb)
                existing = _table_names(conn)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise CpmctlError(f"--store {path}: not a usable SQLite database ({e}); is it the right file?") from None
            if existing and "meta" not in existing:
                raise CpmctlError(f"--store {path}: a SQLite database but not a cpmctl dedup store")
            if not existing:
                settings = DedupSettings(DEFAULT_THRESHOLD if threshold is None else threshold, bool(normalize))
                settings.validate()
                _create(conn, settings)
            else:
                settings = _check_settings(path, conn, threshold, normalize)
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
        """The subset of `hashes` already in the store. Probed in sorted order: neighbouring keys share B-tree
        pages, which keeps the page cache hot."""
        hashes = sorted(hashes)
        found: set[int] = set()
        for i in range(0, len(hashes), _IN_BATCH):
            part = hashes[i : i + _IN_BATCH]
            part += part[:1] * (_IN_BATCH - len(part))  # pad with a repeat: same statement text every time
            found.update(row[0] for row in self.conn.execute(_LOOKUP_SQL, part))
        return found

    def __contains__(self, h: int) -> bool:
        return bool(self.lookup([h]))

    def known(self, hashes: np.ndarray) -> set[int]:
        """The subset of `hashes` (an int64 array) already in the store, exactly: the membership filter clears most
        new ones, the in-memory `recent` answers for this run's paragraphs, SQLite (sorted, batched, the main table
        only) for the rest."""
        maybe = set(hashes[self.membership.maybe(hashes)].tolist())
        found = maybe & self.recent
        rest = sorted(maybe - found)
        for i in range(0, len(rest), _IN_BATCH):
            part = rest[i : i + _IN_BATCH]
            part += part[:1] * (_IN_BATCH - len(part))
            found.update(row[0] for row in self.conn.execute(_LOOKUP_MAIN_SQL, part))
        return found

    @property
    def recent(self) -> set[int]:
        if self._recent is None:
            self._recent = {row[0] for row in self.conn.execute("SELECT hash FROM recent")}
        return self._recent

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
        """A filter of every hash in the store, sized for twice as many."""
        rows = self.conn.execute("SELECT hash FROM paragraphs UNION ALL SELECT hash FROM recent")
        built = MembershipFilter(2 * self.paragraph_count)
        while batch := rows.fetchmany(1 << 16):
            built.add(np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch)))
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
        """Move `recent` into `paragraphs` in key order: each B-tree page is rewritten once per merge, not once
        per key. One transaction, so a kill leaves either table state intact."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR IGNORE INTO paragraphs(hash) SELECT hash FROM recent ORDER BY hash")
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
                     new_hashes: list[int], paragraphs: int) -> None:
        """One transaction: the chunk's new paragraphs, its decisions and the input's progress."""
        if first_line != record.lines:
            raise CpmctlError(f"{record.path}: chunk at line {first_line + 1} does not follow the {record.lines} "
                              "lines already committed")
        conn = self.conn
        # Into the filter first: a failed commit leaves it with extra hashes (harmless), never without one.
        self.membership.add(np.array(new_hashes, dtype=np.int64))
        self._dirty = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            _insert_recent(conn, new_hashes)
            self.last_inserted = conn.total_changes - before
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
            self._recent.update(new_hashes)
        record.lines = first_line + lines
        if self.recent_rows >= MERGE_ROWS:
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


def _insert_recent(conn: sqlite3.Connection, hashes: list[int]) -> None:
    """One statement for the whole batch: SQLite reads the integers from one JSON array (json_each, in SQLite
    since 3.38) at about twice the speed of binding them row by row."""
    if _JSON_EACH:
        conn.execute("INSERT OR IGNORE INTO recent(hash) SELECT value FROM json_each(?)", (json.dumps(hashes),))
    else:
        conn.executemany("INSERT OR IGNORE INTO recent(hash) VALUES (?)", ((h,) for h in hashes))


_JSON_EACH = sqlite3.sqlite_version_info >= (3, 38, 0)


def _inspect(path: Path, threshold: float | None, normalize: bool | None) -> None:
    """Read-only checks of an existing file (no journal-mode switch, no lock file): refuse it untouched."""
    try:
        conn = sqlite3.connect(f"{Path(os.path.abspath(path)).as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise CpmctlError(f"--store {path}: cannot open it read-only ({e})") from None
    try:
        try:
            existing = _table_names(conn)
        except sqlite3.DatabaseError as e:
            raise CpmctlError(f"--store {path}: not a usable SQLite database ({e}); is it the right file?") from None
        if existing and "meta" not in existing:
            raise CpmctlError(f"--store {path}: a SQLite database but not a cpmctl dedup store")
        missing = sorted(TABLES - existing) if existing else []
        if missing:
            raise CpmctlError(f"--store {path}: a damaged dedup store (no table '{missing[0]}'); restore it from a "
                              "backup or start a new store")
        if existing:
            _check_settings(path, conn, threshold, normalize)
    finally:
        conn.close()


def _configure(conn: sqlite3.Connection, cache_mb: int) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA temp_store=MEMORY")


TABLES = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


def _table_names(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _create(conn: sqlite3.Connection, settings) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.strip().split(";"):
        if statement.strip():
            conn.execute(statement)
    meta = {"format": FORMAT, "version": str(VERSION), "hash": HASH, "threshold": repr(settings.threshold),
            "normalize": "true" if settings.normalize else "false", "paragraphs": "0", "created": str(time.time())}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    conn.execute("COMMIT")


def _check_settings(path: Path, conn: sqlite3.Connection, threshold: float | None, normalize: bool | None):
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if meta.get("format") != FORMAT:
        raise CpmctlError(f"--store {path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise CpmctlError(f"--store {path}: version {meta.get('version')} is newer than this cpmctl reads ({VERSION})")
    if meta.get("hash") != HASH:
        raise CpmctlError(f"--store {path}: hashes are {meta.get('hash')}, this cpmctl computes {HASH}")
    try:
        stored = DedupSettings(float(meta["threshold"]), meta["normalize"] == "true")
    except (KeyError, ValueError):
        raise CpmctlError(f"--store {path}: meta table lacks threshold/normalize; not a complete cpmctl store") from None
    if threshold is not None and abs(threshold - stored.threshold) > 1e-12:
        raise CpmctlError(f"--store {path}: written with --threshold {stored.threshold}, this run asks {threshold}; "
                          "use the same settings or a new store")
    if normalize is not None and bool(normalize) != stored.normalize:
        raise CpmctlError(f"--store {path}: written with normalize={str(stored.normalize).lower()}, this run asks "
                          f"{str(bool(normalize)).lower()}; use the same settings or a new store")
    return stored
