"""Document outputs of `data filter`, `dedup` and `pack`: names (format and compression from the extension) and the
atomic writer (data/textio.py re-exports all of it; docs/formats.md, "Raw text").

A file output goes to a temp name and is renamed when complete; a directory output (shards part-00000.<ext>,
part-00001.<ext>, ...) is built in a temp directory and swapped in when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.data.background import BackgroundFile
from cpmctl.io import commit_dir, disk_full_error, make_temp, remove

FORMAT_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text"}
COMPRESSION_EXTENSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
MANIFEST = "manifest.json"


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


# ----- writing -------------------------------------------------------------------------------------------------
def open_writer(path: Path, compression: str | None):
    raw = _open_empty(path)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0), raw
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False), raw
    return raw, raw


def _open_empty(path: Path):
    """`path` for writing from its start, without O_TRUNC when it is empty already (the temp file just made for
    it): on ext4 a truncating open makes the close flush every dirty page of the file (auto_da_alloc), a quarter
    of a second for a 700 MB output, on the run's critical path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


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
            self._open(self.tmp)
            self.shards.append(ShardInfo(spec.path.name))

    def _next_shard(self) -> None:
        self._close_file()
        name = f"part-{len(self.shards):05d}{extension_for(self.spec.format, self.spec.compression)}"
        self._open(self.tmp / name)
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

    def write_many(self, data: bytes, ends) -> None:
        """write() of each line of `data` (whole output lines; `ends`: the offset just past each), as one write
        unless a shard of a directory output would end inside it."""
        n = len(ends)
        if not n:
            return
        shard = self.shards[-1] if self.shards else None
        if self.spec.is_dir and (self._file is None or shard.bytes + (int(ends[-2]) if n > 1 else 0) >= self.shard_bytes):
            for a, b in zip([0, *ends[:-1]], ends):
                self.write(data[int(a) : int(b)])
            return
        try:
            self._file.write(data)
        except OSError as e:
            raise disk_full_error(e, self.spec.path, "the output") or e from None
        shard.documents, shard.bytes = shard.documents + n, shard.bytes + len(data)
        self.documents, self.bytes = self.documents + n, self.bytes + len(data)

    def _open(self, path: Path) -> None:
        stream, self._raw = open_writer(path, self.spec.compression)
        self._file = BackgroundFile(stream)  # the kernel copy (or compression) overlaps the caller's next block

    def _close_file(self) -> None:
        if self._file is None:
            return
        file, raw, self._file, self._raw = self._file, self._raw, None, None
        try:
            file.close()
            if raw is not file.target:
                raw.flush()
                os.fsync(raw.fileno())
        finally:
            raw.close()  # also after a failed write: no descriptor left open

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
