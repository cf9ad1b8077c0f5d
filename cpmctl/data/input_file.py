"""An uncompressed input read by offset, for `data dedup`'s writer, which hands the reading itself to its workers."""

from __future__ import annotations

import os
from typing import Iterator

from cpmctl import CpmctlError
from cpmctl.data.textio import DEFAULT_CHUNK_BYTES, Block, Shard, changed_error


class InputFile:
    """An uncompressed input for a reader that hands its blocks to workers: blocks are cut at newlines without
    reading the bytes between them (a worker reads its own block from the page cache, and counts its lines), and
    the reader reads a block's bytes back only when it writes from them, into one buffer it reuses (no fresh
    memory to fault in). Read with pread, not mapped: a file truncated under a mapping kills the process with
    SIGBUS, here it is a short read, reported as the file having changed."""

    _CUT_WINDOW = 1 << 16

    def __init__(self, shard: Shard):
        self.shard = shard
        self.fd = os.open(shard.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size  # the input as it was when opened: later appends are not read
        self._buffer = bytearray()

    def blocks(self, index: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Block]:
        """The blocks read_blocks would cut (the same offsets), without their bytes or line numbers (first and
        lines are -1: the reader counts them as the workers' results come back in order)."""
        offset = 0
        while offset < self.size:
            end = self._line_end(min(offset + chunk_bytes, self.size) - 1)
            yield Block(index, -1, -1, None, (str(self.shard.path), offset, end - offset, None))
            offset = end

    def _line_end(self, at: int) -> int:
        """Just past the first newline at or after `at` (the end of the input when there is none)."""
        while at < self.size:
            window = os.pread(self.fd, min(self._CUT_WINDOW, self.size - at), at)
            if not window:
                break  # shorter than when opened: the block's reader finds it changed
            found = window.find(b"\n")
            if found >= 0:
                return at + found + 1
            at += len(window)
        return self.size

    def read(self, offset: int, size: int) -> memoryview:
        """The block's bytes, valid until the next read."""
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        got = 0
        while got < size and (n := os.preadv(self.fd, [view[got:]], offset + got)):
            got += n
        if got != size:
            raise CpmctlError(changed_error(self.shard.path, offset, size))
        return view

    def close(self) -> None:
        os.close(self.fd)
