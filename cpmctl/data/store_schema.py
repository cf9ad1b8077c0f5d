"""The dedup store's schema, and the checks an existing file passes before a run may write it (data/store.py;
docs/formats.md, "Dedup store"): a refused file is left exactly as it was."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cpmctl import CpmctlError

FORMAT = "cpmctl-dedup"
VERSION = 2  # 2: the `pending` table (a store of version 1 is upgraded when opened)
HASH = "xxh3_64"
DEFAULT_THRESHOLD = 0.7


@dataclass(frozen=True)
class DedupSettings:
    threshold: float = DEFAULT_THRESHOLD
    normalize: bool = False

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise CpmctlError(f"--threshold must be in (0, 1], got {self.threshold}")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS paragraphs (hash INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS recent (hash INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY, hashes BLOB NOT NULL);
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


def upgrade(conn: sqlite3.Connection) -> None:
    """A version-1 store gets the `pending` table; its version says 2 from then on (an older cpmctl would not
    read `pending`, so it must refuse the store)."""
    if "pending" not in table_names(conn):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS pending"):].split(";")[0])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(VERSION),))
        conn.execute("COMMIT")


def inspect_file(path: Path, threshold: float | None, normalize: bool | None) -> None:
    """Read-only checks of an existing file (no journal-mode switch, no lock file): refuse it untouched."""
    try:
        conn = sqlite3.connect(f"{Path(os.path.abspath(path)).as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise CpmctlError(f"--store {path}: cannot open it read-only ({e})") from None
    try:
        try:
            existing = table_names(conn)
        except sqlite3.DatabaseError as e:
            raise CpmctlError(f"--store {path}: not a usable SQLite database ({e}); is it the right file?") from None
        if existing and "meta" not in existing:
            raise CpmctlError(f"--store {path}: a SQLite database but not a cpmctl dedup store")
        missing = sorted(TABLES - existing) if existing else []
        if missing:
            raise CpmctlError(f"--store {path}: a damaged dedup store (no table '{missing[0]}'); restore it from a "
                              "backup or start a new store")
        if existing:
            check_settings(path, conn, threshold, normalize)
    finally:
        conn.close()


def configure(conn: sqlite3.Connection, cache_mb: int) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA temp_store=MEMORY")


TABLES = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA)) - {"pending"}  # a v1 store lacks it


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def create(conn: sqlite3.Connection, settings) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.strip().split(";"):
        if statement.strip():
            conn.execute(statement)
    meta = {"format": FORMAT, "version": str(VERSION), "hash": HASH, "threshold": repr(settings.threshold),
            "normalize": "true" if settings.normalize else "false", "paragraphs": "0", "created": str(time.time())}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    conn.execute("COMMIT")


def check_settings(path: Path, conn: sqlite3.Connection, threshold: float | None, normalize: bool | None):
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
