"""`--workers N` for the data commands: one pool for all inputs, blocks of raw bytes, one ordered writer. The
outputs of 1 and 2 workers must be byte-identical, across input-file and block boundaries."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from cpmctl import CpmctlError
from cpmctl.data.dedup import dedup
from cpmctl.data.filter import run_filter
from cpmctl.data.parallel import InOrder, ordered_map
from cpmctl.data.recipe import FilterRecipe
from cpmctl.data.input_file import InputFile
from cpmctl.data.textio import output_spec, read_blocks, read_chunks, resolve_inputs
from cpmctl.data.vocab import build_vocab

ASSETS = Path(__file__).resolve().parent.parent / "cpmctl" / "assets" / "corpus"


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_and_passes_in_order_items_through():
    items = [InOrder("start")] + list(range(40)) + [InOrder("middle")] + list(range(40, 60)) + [InOrder("end")]
    for workers in (1, 2):
        got = list(ordered_map(_square, items, workers, window=3))
        assert [i for i, _ in got] == items
        assert [r for i, r in got if not isinstance(i, InOrder)] == [x * x for x in range(60)]
        assert all(r is None for i, r in got if isinstance(i, InOrder))


def _fail_at_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven is bad")
    return x


def _die_at_5(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def _echo_big(x: bytes) -> bytes:
    return x * 2


def _refuse_to_start() -> None:
    raise CpmctlError("the worker's setup failed")


def _live_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("cpmctl-worker")]


def test_ordered_map_raises_a_workers_error_in_its_place_and_stops_the_workers():
    got = []
    with pytest.raises(ValueError, match="seven is bad"):
        for item, result in ordered_map(_fail_at_7, range(20), 2, window=4):
            got.append(result)
    assert got == list(range(7))  # everything before the failing item, in order
    assert not _live_workers()


def test_ordered_map_names_a_worker_that_died():
    with pytest.raises(CpmctlError, match=r"data worker 1 died \(exit code 3\)"):
        list(ordered_map(_die_at_5, range(200), 2))
    assert not _live_workers()

    def slowly(n):  # items still being sent to the worker after it died: the send fails, not the read
        for i in range(n):
            time.sleep(0.005)
            yield i

    with pytest.raises(CpmctlError, match=r"data worker 1 died \(exit code 3\)"):
        list(ordered_map(_die_at_5, slowly(120), 2, window=100))
    assert not _live_workers()


def test_ordered_map_reports_a_failed_worker_setup_as_the_error():
    with pytest.raises(CpmctlError, match="the worker's setup failed"):
        list(ordered_map(_square, range(5), 2, initializer=_refuse_to_start))
    assert not _live_workers()


def test_ordered_map_moves_items_and_results_larger_than_a_pipe():
    """Items and answers of several MB both ways (the task send cannot block the consumer: it goes through the
    sender thread while the worker waits for its answer to be read)."""
    items = [bytes([i]) * (3 << 20) for i in range(9)]
    assert [r for _, r in ordered_map(_echo_big, items, 2, window=5)] == [x * 2 for x in items]
    assert not _live_workers()


def test_a_consumer_that_stops_early_leaves_no_worker():
    stream = ordered_map(_square, range(100), 2)
    assert next(stream) == (0, 0)
    stream.close()
    assert not _live_workers()


def test_blocks_hold_the_same_lines_as_chunks(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\r\n{"text": "c"}')  # blank line, CRLF, no final newline
    shard = resolve_inputs([src])[0]
    for size in (1, 7, 1 << 20):
        blocks = list(read_blocks(shard, 0, size))
        assert [line for b in blocks for line in b.split()] == [x.rstrip(b"\n") for _, c in read_chunks(shard) for x in c]
        assert [b.first for b in blocks] == [sum(b.lines for b in blocks[:i]) for i in range(len(blocks))]


def _split_corpus(tmp_path: Path, files: int = 3, lines_per_file: int = 150) -> Path:
    """Part of the bundled corpus (planted boilerplate, spam, duplicates) in several files, plus bad lines."""
    lines = (ASSETS / "batch1.jsonl").read_text(encoding="utf-8").splitlines()[: files * lines_per_file]
    out = tmp_path / "in"
    out.mkdir()
    for i in range(files):
        part = lines[i * lines_per_file : (i + 1) * lines_per_file]
        part.insert(7, "{not json")
        part.insert(20, "")
        (out / f"part-{i}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
    return out


def test_filter_with_two_workers_writes_the_same_bytes(tmp_path):
    src = _split_corpus(tmp_path)
    shards = resolve_inputs([src])
    results = {}
    for w in (1, 2):
        r = run_filter(shards, output_spec(tmp_path / f"kept{w}.jsonl", "jsonl", None), FilterRecipe(),
                       rejected=tmp_path / f"rej{w}.jsonl", workers=w, chunk_bytes=30_000)
        results[w] = {k: v for k, v in r.to_dict().items() if k not in ("seconds", "mb_per_s", "output", "rejected_file")}
    assert results[1] == results[2]
    assert (tmp_path / "kept1.jsonl").read_bytes() == (tmp_path / "kept2.jsonl").read_bytes()
    assert (tmp_path / "rej1.jsonl").read_bytes() == (tmp_path / "rej2.jsonl").read_bytes()
    rejected = [json.loads(line)["filter"] for line in (tmp_path / "rej1.jsonl").read_text().splitlines()]
    assert len(Counter(r["rule"] for r in rejected)) >= 3 and results[1]["malformed"] == 3
    # Line numbers in the rejected file are counted across block boundaries.
    first = rejected[0]
    path, line = first["source"].rsplit(":", 1)
    record = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[int(line) - 1])
    assert record["text"] == json.loads((tmp_path / "rej1.jsonl").read_text().splitlines()[0])["text"]


def test_dedup_with_two_workers_writes_the_same_bytes_and_store(tmp_path):
    rng = random.Random(4)
    pool = [f"第{i}段：" + "".join(rng.choice("的一是了我不人在他有这个上们来到时大地为子中") for _ in range(30)) for i in range(500)]
    src = tmp_path / "in"
    src.mkdir()
    for f in range(3):
        docs = ["\n".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) for _ in range(400)]
        (src / f"p{f}.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                                         encoding="utf-8")
    shards = resolve_inputs([src])
    outs = {}
    for w in (1, 2):
        r = dedup(shards, output_spec(tmp_path / f"o{w}.jsonl", "jsonl", None), tmp_path / f"s{w}.sqlite", workers=w,
                  chunk_bytes=10_000)
        outs[w] = (r.kept, r.duplicates, r.store_paragraphs)
        # A finished run replayed with the other worker count: the same bytes again, nothing added.
        again = dedup(shards, output_spec(tmp_path / f"r{w}.jsonl", "jsonl", None), tmp_path / f"s{w}.sqlite",
                      workers=3 - w, chunk_bytes=10_000)
        assert again.new_paragraphs == 0 and (tmp_path / f"r{w}.jsonl").read_bytes() == (tmp_path / f"o{w}.jsonl").read_bytes()
    assert outs[1] == outs[2] and outs[1][1] > 0
    assert (tmp_path / "o1.jsonl").read_bytes() == (tmp_path / "o2.jsonl").read_bytes()


def test_input_file_blocks_are_cut_where_read_blocks_cuts(tmp_path):
    """dedup's workers read their own blocks of an InputFile: the same offsets as read_blocks, hence the same
    journal batches whatever the worker count or the reading path."""
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "a"}\n\n{"text": "bb"}\r\n' * 50 + b'{"text": "c"}')  # no final newline
    shard = resolve_inputs([src])[0]
    for size in (1, 7, 100, 1 << 20):
        source = InputFile(shard)
        blocks = list(source.blocks(0, size))
        expected = list(read_blocks(shard, 0, size))
        assert [b.source[1:3] for b in blocks] == [(e.source[1], e.source[2]) for e in expected]
        for b, e in zip(blocks, expected):
            assert b.data is None and b.first == -1
            b.load()
            assert b.data == e.data
        source.close()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert list(InputFile(resolve_inputs([empty])[0]).blocks(0)) == []


_CHANGE = {"how": "rewrite"}


def _hash_then_change(block):
    """hash_lines, then the input file changed once its first block is read: as if another program were still
    writing it (module level: the pool pickles the function by name)."""
    from cpmctl.data.dedup import hash_lines

    chunk = hash_lines(block)
    path, offset, size, _ = block.source
    if offset == 0:
        data = Path(path).read_bytes()
        if _CHANGE["how"] == "rewrite":
            Path(path).write_bytes(data.replace("第".encode(), "弟".encode()))  # same length, other bytes
        else:
            with open(path, "r+b") as f:
                f.truncate(len(data) // 2)
    return chunk


def _with_work(ordered_map, fn):
    return lambda _fn, *args, **kwargs: ordered_map(fn, *args, **kwargs)


def test_dedup_refuses_an_input_that_changes_under_the_workers(tmp_path, monkeypatch):
    """The writer takes the kept lines from its mapping of the input, the workers hashed their own reads: bytes
    that differ (or are gone) are a one-line error, and no output appears."""
    import pytest

    from cpmctl import CpmctlError
    from cpmctl.data import dedup as dedup_module

    for change in ("rewrite", "truncate"):
        src = tmp_path / f"{change}.jsonl"
        src.write_text("".join(json.dumps({"text": f"第{i}段"}, ensure_ascii=False) + "\n" for i in range(3000)),
                       encoding="utf-8")
        _CHANGE["how"] = change
        monkeypatch.setattr(dedup_module, "ordered_map", _with_work(dedup_module.ordered_map, _hash_then_change))
        out = tmp_path / f"{change}-out.jsonl"
        with pytest.raises(CpmctlError, match="changed while it was being read"):
            dedup(resolve_inputs([src]), output_spec(out, "jsonl", None), tmp_path / f"{change}.sqlite", workers=2,
                  chunk_bytes=4096)
        assert not out.exists()


def test_vocab_with_two_workers_is_the_same(tmp_path):
    src = _split_corpus(tmp_path, files=2, lines_per_file=60)
    shards = resolve_inputs([src])
    a = build_vocab(shards, tmp_path / "v1.txt", size=2000, workers=1, chunk_bytes=20_000)
    b = build_vocab(shards, tmp_path / "v2.txt", size=2000, workers=2, chunk_bytes=20_000)
    assert a.md5 == b.md5 and a.documents == b.documents == 120
