"""Raw text in and out, shared by `data filter`, `dedup`, `vocab` and `pack`.

Two formats (docs/formats.md, "Raw text"):
  jsonl  one JSON object per line with a string field `text` (paragraphs separated by "\\n"); other fields are
         carried through untouched. Blank lines are ignored.
  text   the original CPM-Live format: one document per line, paragraphs separated by the literal `<n>`.
Either may be gzip (.gz) or zstd (.zst) compressed. An input is a file, a directory (every data file below it) or
a glob; its files are read in sorted order, so every command sees the documents in one deterministic order.

Inside cpmctl a document's text always separates paragraphs with "\\n"; `<n>` exists only on disk.
Outputs are written atomically: a file output goes to a temp name and is renamed when complete; a directory output
(shards part-00000.<ext>, part-00001.<ext>, ...) is built in a temp directory and swapped in when complete.
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

from cpmctl import CpmctlError
from cpmctl.io import commit_dir, disk_full_error, make_temp, remove

FORMATS = ("jsonl", "text")
FORMAT_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text"}
COMPRESSION_EXTENSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_PARAGRAPH_SEP = "<n>"
MANIFEST = "manifest.json"
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Shard:
    path: Path
    format: str  # jsonl | text
    compression: str | None  # gzip | zstd | None


class MalformedLine(ValueError):
    """A line that is not a document (bad JSON, no string `text`, bad UTF-8); skipped and counted or fatal."""


# ----- naming --------------------------------------------------------------------------------------------------
def split_extension(path: str | Path) -> tuple[str | None, str | None]:
    """(format, compression) from a file name: data.jsonl.gz -> ("jsonl", "gzip"); unknown -> (None, None)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSION_EXTENSIONS:
        compression = COMPRESSION_EXTENSIONS[suffixes.pop()]
    fmt = FORMAT_EXTENSIONS.get(suffixes[-1]) if suffixes else None
    return fmt, compression


def extension_for(fmt: str, compression: str | None) -> str:
    ext = ".jsonl" if fmt == "jsonl" else ".txt"
    return ext + {None: "", "gzip": ".gz", "zstd": ".zst"}[compression]


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
    """Whole lines of one input as one bytes object: what a worker is sent (one string to pickle, not a list)."""
    shard: int  # index of the input in the run
    first: int  # index of its first line in the input
    lines: int
    data: bytes

    def split(self) -> list[bytes]:
        """The lines, without their newline (parse_line and as_output_line read them the same either way)."""
        lines = self.data.split(b"\n")
        if self.data.endswith(b"\n"):
            lines.pop()
        return lines


def read_blocks(shard: Shard, index: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Block]:
    """Blocks of about `chunk_bytes` of whole lines; a damaged file is a one-line error."""
    line_no = 0
    with open_binary(shard.path, shard.compression) as f:
        while True:
            with _reading(shard, lambda: line_no):
                data = f.read(chunk_bytes)
                if data and not data.endswith(b"\n"):
                    data += f.readline()
            if not data:
                return
            n = data.count(b"\n") + (not data.endswith(b"\n"))
            yield Block(index, line_no, n, data)
            line_no += n


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
            utf8 = line[:1] == b"{" and line[1:2] != b"\0"  # what json.loads(bytes) would guess, decoded at once
            record = json.loads(line.decode("utf-8", "surrogatepass") if utf8 else line)
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


# ----- writing -------------------------------------------------------------------------------------------------
def open_writer(path: Path, compression: str | None):
    raw = open(path, "wb")
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0), raw
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False), raw
    return raw, raw


@dataclass
class ShardInfo:
    name: str
    documents: int = 0
    bytes: int = 0


@dataclass
class OutputSpec:
    path: Path
    format: str
    compression: str | None
    is_dir: bool


def output_spec(out: str | Path, fmt: str, compression: str | None) -> OutputSpec:
    """A path with a data extension is one file; anything else is a directory of shards. The format must match.
    Whether an existing output may be replaced is the output policy's call (cpmctl/outputs.py, `claim_output`)."""
    path = Path(out)
    ext_fmt, ext_compression = split_extension(path)
    if ext_fmt is None:
        if path.exists() and not path.is_dir():
            raise CpmctlError(f"--output {path}: exists and is not a directory (name a .jsonl/.txt file or a directory)")
        return OutputSpec(path, fmt, compression, True)
    if ext_fmt != fmt:
        raise CpmctlError(f"--output {path}: the input is {fmt} but the output name says {ext_fmt}")
    if path.is_dir():
        raise CpmctlError(f"--output {path}: is a directory")
    return OutputSpec(path, fmt, ext_compression, False)


def claim_output(spec: OutputSpec, command: str, inputs=(), force: bool = False, what: str = "--output"):
    """The output policy (cpmctl/outputs.py) for a document output: a directory of shards is also this command's
    own when its manifest.json (of an older cpmctl) says so."""
    from cpmctl.outputs import claim

    def own_manifest(path: Path) -> bool:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("command") == command.split()[-1]

    return claim(spec.path, command, kind="dir" if spec.is_dir else "file", force=force, inputs=inputs, what=what,
                 accept=own_manifest)


class DocumentWriter:
    """Writes output lines to a single file or to size-capped shards; nothing is visible until `close()`.

    `abort()` (or an exception) removes everything written; a killed process leaves only dot-named temp files
    (`.NAME.PID.*.tmp`, removed by the next run). `output`: the outputs.claim() that marks the result as a
    command's own."""

    def __init__(self, spec: OutputSpec, shard_bytes: int = 512 << 20, output=None):
        self.spec, self.shard_bytes, self.output = spec, shard_bytes, output
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self.bytes = 0
        self._file = self._raw = None
        self.tmp = make_temp(spec.path, directory=spec.is_dir)
        if not spec.is_dir:
            self._file, self._raw = open_writer(self.tmp, spec.compression)
            self.shards.append(ShardInfo(spec.path.name))

    def _next_shard(self) -> None:
        self._close_file()
        name = f"part-{len(self.shards):05d}{extension_for(self.spec.format, self.spec.compression)}"
        self._file, self._raw = open_writer(self.tmp / name, self.spec.compression)
        self.shards.append(ShardInfo(name))

    def write(self, line: bytes) -> None:
        try:
            if self.spec.is_dir and (self._file is None or self.shards[-1].bytes >= self.shard_bytes):
                self._next_shard()
            self._file.write(line)
        except OSError as e:
            raise disk_full_error(e, self.spec.path, "the output") or e from None
        shard = self.shards[-1]
        shard.documents += 1
        shard.bytes += len(line)
        self.documents += 1
        self.bytes += len(line)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            if self._raw is not self._file:
                self._raw.flush()
                os.fsync(self._raw.fileno())
                self._raw.close()
            self._file = self._raw = None

    def close(self, **manifest) -> Path:
        """Finish and rename into place (an existing output is removed last); a directory gets a manifest.json
        listing its shards."""
        try:
            if self.spec.is_dir and self._file is None:
                self._next_shard()  # an empty result is still one (empty) shard
            self._close_file()
            if self.spec.is_dir:
                info = {"format": self.spec.format, "compression": self.spec.compression, "documents": self.documents,
                        "shards": [s.__dict__ for s in self.shards], **manifest}
                (self.tmp / MANIFEST).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
                if self.output is not None:
                    self.output.stamp(self.tmp)
                commit_dir(self.tmp, self.spec.path)
            else:
                os.replace(self.tmp, self.spec.path)
                if self.output is not None:
                    self.output.stamp()
        except OSError as e:
            raise disk_full_error(e, self.spec.path, "the output") or e from None
        return self.spec.path

    def abort(self) -> None:
        try:
            with contextlib.suppress(OSError):  # a full disk fails the close too; the temp goes anyway
                self._close_file()
        finally:
            remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


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
