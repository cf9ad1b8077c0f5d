"""Raw text in and out, shared by `data filter`, `dedup`, `vocab` and `pack`.

Two formats (docs/formats.md, "Raw text"):
  jsonl  one JSON object per line with a string field `text` (paragraphs separated by "\\n"); other fields are
         carried through untouched. Blank lines are ignored.
  text   the original CPM-Live format: one document per line, paragraphs separated by the literal `<n>`.
Either may be gzip (.gz) or zstd (.zst) compressed. An input is a file, a directory (every data file below it) or
a glob; its files are read in sorted order, so every command sees the documents in one deterministic order.

Inside cpmctl a document's text always separates paragraphs with "\\n"; `<n>` exists only on disk.
Outputs are written atomically (data/textout.py, re-exported here): a file output goes to a temp name and is
renamed when complete; a directory output (shards part-00000.<ext>, ...) is built in a temp dir and swapped in.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import xxhash

from cpmctl import CpmctlError
from cpmctl.data.textout import (  # noqa: F401 - the output half, re-exported: one module for callers
    COMPRESSION_EXTENSIONS, FORMAT_EXTENSIONS, MANIFEST, DocumentWriter, OutputSpec, ShardInfo, claim_output,
    extension_for, open_writer, output_spec, split_extension,
)

FORMATS = ("jsonl", "text")
TEXT_PARAGRAPH_SEP = "<n>"
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Shard:
    path: Path
    format: str  # jsonl | text
    compression: str | None  # gzip | zstd | None


class MalformedLine(ValueError):
    """A line that is not a document (bad JSON, no string `text`, bad UTF-8); skipped and counted or fatal."""


def resolve_inputs(specs: list[str | Path], fmt: str = "auto") -> list[Shard]:
    """The shards named by files, directories and globs, in a deterministic order, all of one format."""
    if fmt not in ("auto", *FORMATS):
        raise CpmctlError(f"--format must be auto, jsonl or text, got '{fmt}'")
    if not specs:
        raise CpmctlError("no --input given")
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p, fmt))
            if not found:
                raise CpmctlError(f"{path}: directory has no .jsonl/.txt files (optionally .gz/.zst)")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise CpmctlError(f"--input {text}: the pattern matches no file")
            paths.extend(found)
        else:
            raise CpmctlError(f"input not found: {path}")
    shards, seen = [], set()
    for p in paths:
        key = p.resolve()
        if key in seen:
            continue
        seen.add(key)
        ext_fmt, compression = split_extension(p)
        shard_fmt = ext_fmt if fmt == "auto" else fmt
        if shard_fmt is None:
            raise CpmctlError(f"{p}: cannot tell the format from the extension; name it .jsonl/.txt or pass --format")
        if not os.access(p, os.R_OK):
            raise CpmctlError(f"{p}: not readable (permission denied)")
        shards.append(Shard(p, shard_fmt, sniff_compression(p, compression)))
    formats = {s.format for s in shards}
    if len(formats) > 1:
        raise CpmctlError(f"inputs mix formats ({', '.join(sorted(formats))}); give one format per run")
    return shards


MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


def sniff_compression(path: Path, by_extension: str | None) -> str | None:
    """The compression the file's first bytes show (gzip, zstd), whatever its extension says: a zstd file named
    .gz or a gzip file named .jsonl is read as what it is. Without a known magic the extension decides (a damaged
    .zst is then reported as unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return by_extension  # open_binary reports the error
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return by_extension


def _is_data_file(path: Path, fmt: str) -> bool:
    if path.name.startswith("."):  # temp files of an unfinished write
        return False
    ext_fmt, _ = split_extension(path)
    return ext_fmt is not None and (fmt == "auto" or ext_fmt == fmt)


# ----- reading -------------------------------------------------------------------------------------------------
def open_binary(path: Path, compression: str | None):
    """A buffered binary reader that decompresses on the fly."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise CpmctlError(f"{path}: cannot open ({e.strerror})") from None
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


@contextlib.contextmanager
def _reading(shard: Shard, line_no: Callable[[], int]):
    """A damaged file (bad gzip/zstd stream, I/O error; zstandard's own errors) as a one-line error."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (OSError, EOFError, zlib.error)) or type(e).__module__.startswith("zstandard"):
            raise CpmctlError(f"{shard.path}: unreadable after line {line_no()} ({_short(e)})") from None
        raise


def read_chunks(shard: Shard, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, list[bytes]]]:
    """(first line index, raw lines) chunks of about `chunk_bytes`; a damaged file is a one-line error."""
    line_no = 0
    with open_binary(shard.path, shard.compression) as f:
        while True:
            with _reading(shard, lambda: line_no):
                lines = f.readlines(chunk_bytes)
            if not lines:
                return
            yield line_no, lines
            line_no += len(lines)


@dataclass
class Block:
    """Whole lines of one input as one bytes object: what a worker is sent (one string to pickle, not a list).
    A block of an uncompressed file knows where it lies (`source`: path, offset, xxh3_64 of `data`): pickled for a
    worker it leaves its bytes behind and the worker reads them from the file itself (from the page cache, where
    the reader just put them), so they cross no pipe; bytes that no longer match are an error, never used (raised
    by split(), in the work function, so the pool hands it back to the command like any other error)."""
    shard: int  # index of the input in the run
    first: int  # index of its first line in the input
    lines: int
    data: bytes | None  # None: read from `source` where it is used (a worker)
    source: tuple | None = None

    @property
    def size(self) -> int:
        """Its bytes in the input (known before they are read)."""
        return self.source[2] if self.data is None else len(self.data)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "data": None} if self.source is not None else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.load()

    def load(self) -> None:
        """Read the bytes from the file when the block came without them. A block of an InputFile (digest None)
        is checked by its reader instead, against the fingerprint of what was read here."""
        if self.data is not None:
            return
        path, offset, size, digest = self.source
        parts, got = [], 0
        with open(path, "rb") as f:
            while got < size and (part := os.pread(f.fileno(), size - got, offset + got)):
                parts.append(part)
                got += len(part)
        self.data = b"".join(parts)
        if digest is not None and xxhash.xxh3_64_intdigest(self.data) != digest:
            self.__dict__["stale"] = changed_error(path, offset, size)

    def split(self) -> list[bytes]:
        """The lines, without their newline (parse_line and as_output_line read them the same either way)."""
        if "stale" in self.__dict__:
            raise CpmctlError(self.__dict__["stale"])
        lines = self.data.split(b"\n")
        if self.data.endswith(b"\n"):
            lines.pop()
        return lines


def read_blocks(shard: Shard, index: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Block]:
    """Blocks of about `chunk_bytes` of whole lines; a damaged file is a one-line error."""
    line_no = offset = 0
    with open_binary(shard.path, shard.compression) as f:
        while True:
            with _reading(shard, lambda: line_no):
                data = f.read(chunk_bytes)
                if data and not data.endswith(b"\n"):
                    data += f.readline()
            if not data:
                return
            n = _newlines(data) + (not data.endswith(b"\n"))
            where = None if shard.compression else (str(shard.path), offset, len(data), xxhash.xxh3_64_intdigest(data))
            yield Block(index, line_no, n, data, where)
            line_no += n
            offset += len(data)


def changed_error(path, offset: int, size: int) -> str:
    return f"{path}: changed while it was being read (bytes {offset}-{offset + size}); rerun once it is complete"


def _newlines(data: bytes) -> int:
    """data.count(b"\\n"), vectorised for large blocks (measured 2x faster at 4 MB)."""
    if len(data) < 1 << 16:
        return data.count(b"\n")
    import numpy as np  # here: textio is imported by commands that never read a large block

    return int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10))


def input_bytes(shards: list[Shard]) -> int | None:
    """The bytes the shards hold as read (their sizes); None when one is compressed (unknown until read)."""
    if any(s.compression for s in shards):
        return None
    return sum(s.path.stat().st_size for s in shards)


def check_readable(shards: list[Shard]) -> None:
    """Fail early, before any output or store write, when a shard cannot even be opened and started."""
    for shard in shards:
        try:
            with open_binary(shard.path, shard.compression) as f:
                f.read(1 << 12)
        except CpmctlError:
            raise
        except Exception as e:  # noqa: BLE001 - gzip, zstd and OS errors all mean "unreadable"
            raise CpmctlError(f"{shard.path}: unreadable ({_short(e)})") from None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]


def parse_line(line: bytes, fmt: str, strip: bool = False) -> tuple[str, dict | None] | None:
    """(text with "\\n" between paragraphs, the JSON record or None); None for a blank jsonl line.
    strip=True strips surrounding whitespace first, as the original preprocessing reads a document
    (`line.strip()`, then `<n>` -> newline); the filters keep the text as it is.
    Raises MalformedLine for a line that is not a document."""
    if fmt == "jsonl":
        if not line.strip():
            return None
        try:
            record = _load_record(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else f"not UTF-8: {e.reason}"
            raise MalformedLine(f"not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise MalformedLine("not a JSON object")
        text = record.get("text")
        if not isinstance(text, str):
            raise MalformedLine("no string field 'text'")
        return (text.strip() if strip else text), record
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedLine(f"not UTF-8 (byte {e.start})") from None
    text = text.strip() if strip else text.rstrip("\r\n")
    return text.replace(TEXT_PARAGRAPH_SEP, "\n"), None


_PLAIN = (str, int, bool, type(None))


def _load_record(line: bytes):
    """The JSON value of a jsonl line: orjson's when it takes the line whole and every value is a string, an int, a
    bool or null (then it is json's: same values, keys in the same order; orjson reads an integer beyond 64 bits as a
    float, so a record with floats or nested values is left to json), else json's, with its errors."""
    if line[:1] == b"{":
        try:
            record = _fast_loads(line)
            if record.__class__ is dict and all(v.__class__ in _PLAIN for v in record.values()):
                return record
        except Exception:  # noqa: BLE001 - json decides, and names the reason
            pass
    utf8 = line[:1] == b"{" and line[1:2] != b"\0"  # what json.loads(bytes) would guess, decoded at once
    return json.loads(line.decode("utf-8", "surrogatepass") if utf8 else line)


def document_texts(lines: list[bytes], fmt: str) -> list:
    """Per line, what parse_line gives: the text, None (a blank jsonl line) or the MalformedLine it raises. A jsonl
    object is parsed with orjson when it is installed (2-3x json's speed, same strings); a line it does not take
    whole (any error, no string `text`) goes through parse_line, so every result and message is parse_line's."""
    out: list = []
    jsonl = fmt == "jsonl"
    for line in lines:
        if jsonl and line[:1] == b"{":
            try:
                text = _fast_loads(line).get("text")
                if text.__class__ is str:
                    out.append(text)
                    continue
            except Exception:  # noqa: BLE001 - parse_line decides, and names the reason
                pass
        try:
            parsed = parse_line(line, fmt)
            out.append(None if parsed is None else parsed[0])
        except MalformedLine as e:
            out.append(e)
    return out


def _json_loads(line: bytes):
    return json.loads(line.decode("utf-8", "surrogatepass"))


try:
    from orjson import loads as _fast_loads
except ImportError:  # an optional accelerator: json reads the same documents
    _fast_loads = _json_loads


def paragraphs(text: str) -> list[str]:
    """Stripped, non-empty paragraphs."""
    return [p for p in (q.strip() for q in text.split("\n")) if p]


def format_document(text: str, record: dict | None, fmt: str) -> bytes:
    """One output line; a jsonl record keeps all its other fields."""
    if fmt == "jsonl":
        record = dict(record or {})
        record["text"] = text
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    return (text.replace("\n", TEXT_PARAGRAPH_SEP) + "\n").encode("utf-8")


def as_output_line(line: bytes) -> bytes:
    """A raw input line copied to an output: same bytes, newline-terminated."""
    line = line.rstrip(b"\r\n")
    return line + b"\n"


class LineErrors:
    """Malformed-line policy: count (and name the first few) or, with --strict, stop at the first."""

    def __init__(self, strict: bool, warn=None, max_warnings: int = 5):
        self.strict, self.warn, self.max_warnings = strict, warn, max_warnings
        self.count = 0

    def __call__(self, path: Path, line_index: int, reason: str) -> None:
        where = f"{path}:{line_index + 1}"
        if self.strict:
            raise CpmctlError(f"{where}: {reason} (--strict stops at malformed lines)")
        self.count += 1
        if self.warn is not None and self.count <= self.max_warnings:
            self.warn(f"{where}: skipped, {reason}")


def read_jsonl(path: str | Path, what: str = "data file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a small JSONL file ('-' = stdin): task data, prompts,
    predictions. A bad line is a CpmctlError naming file:line."""
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CpmctlError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CpmctlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise CpmctlError(f"{path}: is a directory, expected a .jsonl file") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CpmctlError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CpmctlError(f"{path}:{n}: expected an object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows
