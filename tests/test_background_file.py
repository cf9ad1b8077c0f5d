"""The output writer's thread (cpmctl/data/background.py): same bytes, in order; an error on the thread (a full
disk) reaches the command as the same exception, and a failed output leaves nothing behind."""

from __future__ import annotations

import errno
import io

import pytest

from cpmctl.data import background
from cpmctl.data.background import BackgroundFile


class Target(io.BytesIO):
    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.fail_after, self.closed_by_us = fail_after, False

    def write(self, data):
        if self.fail_after is not None and self.tell() + len(data) > self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)

    def close(self):
        self.closed_by_us = True
        self.result = self.getvalue()
        super().close()


def test_bytes_arrive_in_order_across_pieces(monkeypatch):
    monkeypatch.setattr(background, "PIECE", 64)
    target = Target()
    f = BackgroundFile(target)
    expected = b"".join(f"line {i}\n".encode() * (i % 7) for i in range(2000))
    for i in range(2000):
        f.write(f"line {i}\n".encode() * (i % 7))
    f.write(bytearray(b"tail"))
    f.close()
    assert target.closed_by_us and target.result == expected + b"tail"


def test_a_write_error_on_the_thread_is_raised_to_the_caller_and_the_target_closed(monkeypatch):
    monkeypatch.setattr(background, "PIECE", 16)
    target = Target(fail_after=100)
    f = BackgroundFile(target)
    with pytest.raises(OSError) as raised:
        for _ in range(10_000):  # blocks on the bounded queue, so the error surfaces within a few writes
            f.write(b"0123456789abcdef")
        f.drain()
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # sticky: a later write fails the same way, nothing more is written
        f.write(b"more")
    with pytest.raises(OSError):
        f.close()
    assert target.closed_by_us and len(target.result) <= 100


def test_a_full_disk_fails_the_document_output_with_nothing_left_behind(tmp_path, monkeypatch):
    from cpmctl import CpmctlError
    from cpmctl.data import textout
    from cpmctl.data.textio import output_spec

    real = textout.open_writer

    def failing(path, compression):
        stream, raw = real(path, compression)

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                stream.close()

        return Full(), raw

    monkeypatch.setattr(textout, "open_writer", failing)
    out = tmp_path / "out.jsonl"
    with pytest.raises((OSError, CpmctlError)) as raised:
        with textout.DocumentWriter(output_spec(out, "jsonl", None)) as writer:
            for _ in range(100):
                writer.write(b'{"text": "x"}\n' * 10_000)
            writer.close()
    assert "space" in str(raised.value).lower() or "full" in str(raised.value).lower()
    assert list(tmp_path.iterdir()) == []


def test_open_writer_starts_from_empty_without_truncating_open(tmp_path, monkeypatch):
    """The temp output is opened without O_TRUNC (on ext4 that makes the close flush the whole file); a file that
    is not empty is still written from its start, nothing of it left."""
    import os

    from cpmctl.data import textout

    flags = []
    real_open = os.open
    monkeypatch.setattr(textout.os, "open", lambda path, f, *a: flags.append(f) or real_open(path, f, *a))
    for before in (b"", b"old bytes, longer than the new ones\n"):
        path = tmp_path / "out.jsonl"
        path.write_bytes(before)
        stream, raw = textout.open_writer(path, None)
        stream.write(b"new\n")
        raw.close()
        assert path.read_bytes() == b"new\n"
    assert len(flags) == 2 and not any(f & os.O_TRUNC for f in flags)
