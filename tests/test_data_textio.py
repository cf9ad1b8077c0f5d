"""Raw text in and out: formats, compression, shards, malformed lines, atomic outputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from cpmctl import CpmctlError
from cpmctl.data.textio import (
    DocumentWriter,
    LineErrors,
    MalformedLine,
    check_readable,
    claim_output,
    format_document,
    output_spec,
    paragraphs,
    parse_line,
    read_chunks,
    resolve_inputs,
)


def test_parse_and_format_both_formats():
    line = json.dumps({"text": "第一段\n第二段", "id": 7, "meta": {"src": "web"}}, ensure_ascii=False).encode() + b"\n"
    text, record = parse_line(line, "jsonl")
    assert text == "第一段\n第二段" and record["id"] == 7
    assert json.loads(format_document("新文本", record, "jsonl")) == {"text": "新文本", "id": 7, "meta": {"src": "web"}}
    text, record = parse_line("第一段<n>第二段\r\n".encode(), "text")
    assert text == "第一段\n第二段" and record is None
    assert format_document(text, None, "text") == "第一段<n>第二段\n".encode()
    assert parse_line(b"   \n", "jsonl") is None
    assert paragraphs("  a \n\n b\n \u3000 ") == ["a", "b"]


@pytest.mark.parametrize("line,reason", [
    (b"{not json\n", "not valid JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"txt": "x"}\n', "no string field 'text'"),
    (b'{"text": null}\n', "no string field 'text'"),
])
def test_malformed_jsonl(line, reason):
    with pytest.raises(MalformedLine, match=reason):
        parse_line(line, "jsonl")


def test_malformed_text_line_is_bad_utf8():
    with pytest.raises(MalformedLine, match="not UTF-8"):
        parse_line(b"\xff\xfe broken\n", "text")


def test_line_errors_count_or_stop():
    warnings = []
    skip = LineErrors(strict=False, warn=warnings.append)
    skip(Path("a.jsonl"), 4, "not valid JSON")
    assert skip.count == 1 and warnings == ["a.jsonl:5: skipped, not valid JSON"]
    with pytest.raises(CpmctlError, match=r"a.jsonl:5: not valid JSON \(--strict"):
        LineErrors(strict=True)(Path("a.jsonl"), 4, "not valid JSON")


def test_inputs_files_directories_globs_and_compression(tmp_path):
    lines = [json.dumps({"text": f"文档{i}"}, ensure_ascii=False) for i in range(5)]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "d" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines[2] + "\n")
    (tmp_path / "d" / "sub" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(("\n".join(lines[3:]) + "\n").encode()))
    (tmp_path / "d" / "notes.md").write_text("ignored")
    (tmp_path / "d" / ".part.jsonl.tmp").write_text("ignored temp")
    shards = resolve_inputs([tmp_path / "d"])
    assert [s.path.name for s in shards] == ["a.jsonl.gz", "b.jsonl", "c.jsonl.zst"]
    assert [s.compression for s in shards] == ["gzip", None, "zstd"]
    got = [parse_line(line, "jsonl")[0] for s in shards for _, chunk in read_chunks(s) for line in chunk]
    assert sorted(got) == [f"文档{i}" for i in range(5)]
    assert [s.path.name for s in resolve_inputs([str(tmp_path / "d" / "*.jsonl*")])] == ["a.jsonl.gz", "b.jsonl"]
    with pytest.raises(CpmctlError, match="matches no file"):
        resolve_inputs([str(tmp_path / "nothing-*.jsonl")])
    with pytest.raises(CpmctlError, match="input not found"):
        resolve_inputs([tmp_path / "missing.jsonl"])
    (tmp_path / "x.dat").write_text("{}")
    with pytest.raises(CpmctlError, match="cannot tell the format"):
        resolve_inputs([tmp_path / "x.dat"])
    assert resolve_inputs([tmp_path / "x.dat"], "jsonl")[0].format == "jsonl"
    (tmp_path / "y.txt").write_text("文本\n", encoding="utf-8")
    with pytest.raises(CpmctlError, match="inputs mix formats"):
        resolve_inputs([tmp_path / "y.txt", tmp_path / "d" / "b.jsonl"])


def test_compression_is_read_from_the_magic_bytes(tmp_path):
    """A gzip file named .jsonl and a zstd file named .gz are read as what they are."""
    lines = [json.dumps({"text": f"第{i}篇"}, ensure_ascii=False) for i in range(5)]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(data))
    (tmp_path / "zst.jsonl.gz").write_bytes(zstandard.ZstdCompressor().compress(data))
    shards = resolve_inputs([tmp_path / "gz.jsonl", tmp_path / "zst.jsonl.gz"])
    assert [s.compression for s in shards] == ["gzip", "zstd"]
    for shard in shards:
        assert [line for _, chunk in read_chunks(shard) for line in chunk] == [x.encode() + b"\n" for x in lines]


def test_damaged_shards_are_named(tmp_path):
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "abc"}\n' * 5000)[:200])
    shard = resolve_inputs([truncated])[0]
    with pytest.raises(CpmctlError, match=r"t.jsonl.gz: unreadable after line \d+"):
        for _ in read_chunks(shard):
            pass
    bad = tmp_path / "b.jsonl.zst"
    bad.write_bytes(b"definitely not zstd")
    with pytest.raises(CpmctlError, match="b.jsonl.zst: unreadable"):
        check_readable(resolve_inputs([bad]))


def test_writer_shards_atomically_and_cleans_up_on_error(tmp_path):
    spec = output_spec(tmp_path / "out", "jsonl", "zstd")
    assert spec.is_dir
    with DocumentWriter(spec, shard_bytes=30) as w:
        for i in range(5):
            w.write(f'{{"text": "doc {i}"}}\n'.encode())
        assert not (tmp_path / "out").exists()  # nothing visible before close
        w.close()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["documents"] == 5 and len(manifest["shards"]) == 3
    data = b"".join(zstandard.ZstdDecompressor().stream_reader(open(tmp_path / "out" / s["name"], "rb")).read()
                    for s in manifest["shards"])
    assert data.decode().count("\n") == 5

    target = tmp_path / "single.jsonl"
    target.write_text("old complete output\n")
    with pytest.raises(RuntimeError):
        with DocumentWriter(output_spec(target, "jsonl", None)) as w:
            w.write(b"half\n")
            raise RuntimeError("killed")
    assert target.read_text() == "old complete output\n"  # nothing already written is lost
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_spec_guards(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(CpmctlError, match="non-empty directory not written by cpmctl"):
        claim_output(output_spec(tmp_path / "mine", "jsonl", None), "data filter")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
    assert output_spec(tmp_path / "o.jsonl.gz", "jsonl", None).compression == "gzip"


ODD_LINES = [
    b'{"text": "\xe4\xb8\x80\\n\xe4\xba\x8c", "id": 1}', b'{"text": "a", "text": "b"}\r', b'  {"text": "lead"}',
    b'{"text": "x"} trailing', b'{"text": NaN}', b'{"n": NaN, "text": "nan elsewhere"}', b'{"text": "\\ud800 lone"}',
    b'{"text": "\\ud83d\\ude00 pair"}', b'{"text": "\xed\xa0\x80 cesu"}', b'{"text": "\xff bad"}', b'{"text": 5}',
    b'{"id": 1}', b"[1, 2]", b"", b"   \r", b'\xef\xbb\xbf{"text": "bom"}', '{"text": "utf16"}'.encode("utf-16-le"),
    b'{"big": 123456789012345678901234567890, "text": "big int"}', b'{"text": "ctl \x01 char"}',
    b'{"text": "\\u0000 nul"}', b'{"a": ' * 3000 + b"1" + b"}" * 3000, b'{"text": "" }', b'{"text": "\\t\\u3000 "}',
    b'{"text": "nested", "meta": {"big": 123456789012345678901234567890, "f": 1e400}}', b'{"text": "f", "x": 1.5}',
    b'{"text": "i64", "n": -9223372036854775808, "u": 18446744073709551615, "b": true, "z": null}',
]


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
@pytest.mark.parametrize("orjson", [True, False])
def test_document_texts_equals_parse_line_on_every_odd_line(fmt, orjson, monkeypatch):
    import cpmctl.data.textio as textio
    from cpmctl.data.textio import document_texts

    if not orjson:  # the path without the optional accelerator
        monkeypatch.setattr(textio, "_fast_loads", textio._json_loads)

    def reference(line):
        try:
            parsed = parse_line(line, fmt)
        except MalformedLine as e:
            return ("malformed", str(e))
        except RecursionError:
            return ("recursion",)
        return None if parsed is None else parsed[0]

    for line in ODD_LINES:
        try:
            got = document_texts([line], fmt)[0]
        except RecursionError:
            got = ("recursion",)
        if isinstance(got, MalformedLine):
            got = ("malformed", str(got))
        assert got == reference(line), line[:60]


def test_a_block_of_a_plain_file_travels_without_its_bytes(tmp_path):
    import pickle

    from cpmctl.data.textio import read_blocks

    src = tmp_path / "a.jsonl"
    src.write_bytes(b"".join(b'{"text": "%d"}\n' % i for i in range(500)))
    blocks = list(read_blocks(resolve_inputs([src])[0], 0, 1000))
    sent = [pickle.dumps(b) for b in blocks]
    assert all(len(s) < 300 for s in sent)  # the path, offset and checksum, not the 1 kB of lines
    assert [pickle.loads(s).data for s in sent] == [b.data for b in blocks]
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert pickle.loads(pickle.dumps(next(read_blocks(resolve_inputs([gz])[0], 0, 1000)))).data == blocks[0].data
    src.write_bytes(src.read_bytes().replace(b'"1"', b'"x"'))  # changed after it was read
    with pytest.raises(CpmctlError, match="changed while it was being read"):
        pickle.loads(sent[0]).split()  # in the worker's function: the pool returns the error to the command


def test_parse_line_gives_the_same_records_with_and_without_orjson(monkeypatch):
    """parse_line reads a record with orjson when it takes the line: the same text, the same record (values, types,
    key order) and the same error message as json alone, on every odd line."""
    import cpmctl.data.textio as textio

    def results():
        out = []
        for line in ODD_LINES:
            try:
                parsed = parse_line(line, "jsonl")
                out.append(None if parsed is None else (parsed[0], repr(parsed[1])))
            except MalformedLine as e:
                out.append(("malformed", str(e)))
            except RecursionError:
                out.append(("recursion",))
        return out

    with_fast = results()
    monkeypatch.setattr(textio, "_fast_loads", textio._json_loads)
    assert results() == with_fast
    assert textio._fast_loads is not None and sum(r is not None and r[0] != "malformed" for r in with_fast) >= 8
