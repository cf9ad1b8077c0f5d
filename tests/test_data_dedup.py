"""Paragraph-hash dedup: the threshold boundary, a store shared across runs, resume after SIGKILL, workers, and
clear errors for bad stores and inputs."""

from __future__ import annotations

import gzip
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest
import xxhash

from cpmctl import CpmctlError
from cpmctl.data.dedup import dedup, required_seen
from cpmctl.data.store import DedupStore
from cpmctl.data.textio import output_spec, resolve_inputs
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
CHARS = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学"


def para(i: int) -> str:
    """A distinct paragraph for each i."""
    rng = random.Random(i)
    return "".join(rng.choice(CHARS) for _ in range(30)) + f"{i}。"


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "n": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def run(inputs, out, store, **kw):
    shards = resolve_inputs([str(p) for p in inputs])
    return dedup(shards, output_spec(out, shards[0].format, shards[0].compression), store, **kw)


def kept_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """`cpmctl data ARGS` in-process (the real entry point, exit code included)."""
    code, out, err = run_cli(capsys, "data", *args)
    return subprocess.CompletedProcess(args, code, out, err)


def test_required_seen_is_exact_at_the_boundary():
    assert required_seen(0.7, 10) == 7
    assert required_seen(0.7, 3) == 3  # 2/3 = 0.667 < 0.7
    assert required_seen(0.7, 20) == 14
    assert required_seen(0.5, 4) == 2
    assert required_seen(1.0, 5) == 5
    for n in range(1, 200):
        k = required_seen(0.7, n)
        assert k / n >= 0.7 - 1e-12 and (k - 1) / n < 0.7


def test_threshold_boundary_exactly_70_percent(tmp_path):
    seen = [para(i) for i in range(10)]
    base = "\n".join(seen)
    seven = "\n".join(seen[:7] + [para(100 + i) for i in range(3)])  # 7 of 10 known: duplicate (>= 0.7)
    six = "\n".join(seen[:6] + [para(200 + i) for i in range(4)])  # 6 of 10 known: kept
    src = write_jsonl(tmp_path / "in.jsonl", [base, seven, six])
    r = run([src], tmp_path / "out.jsonl", tmp_path / "s.sqlite")
    assert kept_texts(tmp_path / "out.jsonl") == [base, six]
    assert (r.documents, r.kept, r.duplicates) == (3, 2, 1)
    # The kept document's new paragraphs were added; the duplicate's were not.
    with DedupStore.open(tmp_path / "s.sqlite") as store:
        h = lambda p: xxhash.xxh3_64_intdigest(p.encode()) - (1 << 64 if xxhash.xxh3_64_intdigest(p.encode()) >= 1 << 63 else 0)  # noqa: E731
        assert h(para(200)) in store
        assert h(para(100)) not in store
        assert store.paragraph_count == 14


def test_paragraphs_are_stripped_distinct_and_empty_documents_dropped(tmp_path):
    a = f"  {para(1)}  \n\n{para(2)}\n{para(1)}"  # para(1) twice: counted once
    src = write_jsonl(tmp_path / "in.jsonl", [a, "   \n  ", f"{para(1)}\n{para(2)}", ""])
    r = run([src], tmp_path / "out.jsonl", tmp_path / "s.sqlite")
    assert (r.documents, r.kept, r.duplicates, r.empty) == (4, 1, 1, 2)
    assert r.paragraphs == 3 + 2


@pytest.mark.parametrize("merge_rows", [1_000_000, 100])
def test_matches_a_plain_set_implementation(tmp_path, monkeypatch, merge_rows):
    import cpmctl.data.store

    monkeypatch.setattr(cpmctl.data.store, "MERGE_ROWS", merge_rows)  # 100: many bulk merges into `paragraphs`
    rng = random.Random(0)
    pool = [para(i) for i in range(400)]
    texts = ["\n".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(1500)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    run([src], tmp_path / "out.jsonl", tmp_path / "s.sqlite", chunk_bytes=20_000)
    seen, expected = set(), []
    for t in texts:
        hs = {p.strip() for p in t.split("\n") if p.strip()}
        if sum(h in seen for h in hs) >= required_seen(0.7, len(hs)):
            continue
        expected.append(t)
        seen |= hs
    assert kept_texts(tmp_path / "out.jsonl") == expected
    assert 0 < len(expected) < len(texts)
    with DedupStore.open(tmp_path / "s.sqlite") as store:
        in_main = store.conn.execute("SELECT count(*) FROM paragraphs").fetchone()[0]
        assert store.paragraph_count == len(seen) and (in_main > 0) == (merge_rows == 100)


def test_second_run_deduplicates_against_the_first(tmp_path):
    first = write_jsonl(tmp_path / "week1.jsonl", [para(1) + "\n" + para(2), para(3)])
    second = write_jsonl(tmp_path / "week2.jsonl", [para(2) + "\n" + para(1), para(4), para(3) + "\n" + para(5)])
    store = tmp_path / "s.sqlite"
    r1 = run([first], tmp_path / "o1.jsonl", store)
    r2 = run([second], tmp_path / "o2.jsonl", store)
    assert r1.kept == 2
    # para(2)+para(1): 2/2 known; para(4) new; para(3)+para(5): 1/2 = 0.5 < 0.7 kept.
    assert kept_texts(tmp_path / "o2.jsonl") == [para(4), para(3) + "\n" + para(5)]
    assert r2.store_paragraphs == 5
    # Rerunning a finished command replays its decisions: same output, store untouched.
    r3 = run([second], tmp_path / "o3.jsonl", store)
    assert (tmp_path / "o3.jsonl").read_bytes() == (tmp_path / "o2.jsonl").read_bytes()
    assert r3.replayed == 3 and r3.new_paragraphs == 0 and r3.store_paragraphs == 5


def test_workers_give_the_same_result(tmp_path):
    rng = random.Random(1)
    pool = [para(i) for i in range(300)]
    texts = ["\n".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) for _ in range(2000)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    run([src], tmp_path / "one.jsonl", tmp_path / "one.sqlite", chunk_bytes=8_000)
    run([src], tmp_path / "two.jsonl", tmp_path / "two.sqlite", chunk_bytes=8_000, workers=2)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


def test_text_format_gzip_and_directory_outputs(tmp_path):
    lines = [f"{para(1)}<n>{para(2)}", f"{para(2)}<n>{para(1)}", f"{para(3)}"]
    src = tmp_path / "raw.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    r = run([src], tmp_path / "out", tmp_path / "s.sqlite", shard_bytes=50)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.txt.gz", "part-00001.txt.gz"]
    got = b"".join(gzip.open(tmp_path / "out" / s["name"]).read() for s in manifest["shards"]).decode()
    assert got.splitlines() == [lines[0], lines[2]] and r.kept == 2


def _corpus(path: Path, docs: int) -> Path:
    rng = random.Random(7)
    pool = [para(i) for i in range(docs // 2)]
    return write_jsonl(path, ["\n".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) for _ in range(docs)])


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    src = _corpus(tmp_path / "in.jsonl", 40000)
    store, out = tmp_path / "s.sqlite", tmp_path / "out.jsonl"
    args = ["dedup", "--input", src, "--output", out, "--store", store, "--chunk-mb", "0.01"]
    # The killed process runs the same core call the CLI makes (without the CLI's torch import, to start fast).
    script = (
        "import sys; from cpmctl.data.dedup import dedup; from cpmctl.data.textio import resolve_inputs, output_spec;"
        "s = resolve_inputs([sys.argv[1]]); dedup(s, output_spec(sys.argv[2], 'jsonl', None), sys.argv[3],"
        " chunk_bytes=10485)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out), str(store)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batches, deadline = 0, time.time() + 120
    while batches < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=1) as db:
                    batches = db.execute("SELECT count(*) FROM batches").fetchone()[0]
            except sqlite3.OperationalError:
                pass  # tables not created yet
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists(), "a killed run must not leave a partial output"

    resumed = cli(capsys, *args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["replayed"] >= 20  # decisions committed before the kill were reproduced, not redone

    reference = tmp_path / "ref.jsonl"
    run([src], reference, tmp_path / "ref.sqlite")
    assert out.read_bytes() == reference.read_bytes()
    with DedupStore.open(store) as a, DedupStore.open(tmp_path / "ref.sqlite") as b:
        assert a.paragraph_count == b.paragraph_count
        rows = ("SELECT (SELECT count(*) FROM paragraphs) + (SELECT count(*) FROM recent) "
                "+ (SELECT coalesce(sum(length(hashes)), 0) / 8 FROM pending)")
        assert a.conn.execute(rows).fetchone()[0] == a.paragraph_count


def test_resume_rejects_an_input_changed_inside_the_committed_part(tmp_path):
    src = _corpus(tmp_path / "in.jsonl", 300)
    store = tmp_path / "s.sqlite"
    run([src], tmp_path / "o.jsonl", store, chunk_bytes=4000)
    # Completed inputs are keyed by (path, size, mtime); an interrupted one by path, its lines checked on replay.
    with sqlite3.connect(store) as db:
        db.execute("UPDATE inputs SET complete = 0")  # as if the run had been killed before it finished
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = json.dumps({"text": "改过的文档" + para(999)}, ensure_ascii=False) + "\n"
    src.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CpmctlError, match=r"in.jsonl: lines 1-\d+ differ"):
        run([src], tmp_path / "o2.jsonl", store, chunk_bytes=4000)


def test_strict_stops_at_a_malformed_line_and_a_fixed_file_resumes(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    good = [json.dumps({"text": para(i)}, ensure_ascii=False) for i in range(200)]
    src.write_text("\n".join(good[:150] + ['{"text": 3}'] + good[150:]) + "\n", encoding="utf-8")
    store = tmp_path / "s.sqlite"
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", store, "--strict", "--chunk-mb", "0.001")
    assert r.returncode == 2
    assert "in.jsonl:151: no string field 'text'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
    # Without --strict the line is skipped and counted.
    ok = run([src], tmp_path / "o2.jsonl", tmp_path / "s2.sqlite")
    assert ok.malformed == 1 and ok.kept == 200
    # Fix the line and rerun the strict command: it resumes after the committed chunks.
    src.write_text("\n".join(good[:150] + [json.dumps({"text": para(1000)}, ensure_ascii=False)] + good[150:]) + "\n",
                   encoding="utf-8")
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", store, "--strict",
            "--chunk-mb", "0.001", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replayed"] > 0 and json.loads(r.stdout)["kept"] == 201


def test_store_errors_are_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [para(1)])
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database, just bytes" * 200)
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", corrupt)
    assert r.returncode == 2 and "not a usable SQLite database" in r.stderr and "Traceback" not in r.stderr
    assert corrupt.read_bytes().startswith(b"this is not a database")  # nothing overwritten

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", other)
    assert r.returncode == 2 and "not a cpmctl dedup store" in r.stderr

    store = tmp_path / "s.sqlite"
    run([src], tmp_path / "o.jsonl", store, threshold=0.8, normalize=True)
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", store, "--threshold", "0.7")
    assert r.returncode == 2 and "written with --threshold 0.8, this run asks 0.7" in r.stderr
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o.jsonl", "--store", store, "--no-normalize")
    assert r.returncode == 2 and "normalize=true" in r.stderr
    # Settings not given come from the store.
    assert run([src], tmp_path / "o3.jsonl", store).threshold == 0.8

    # A store missing one of its tables is refused by name, and left byte-identical.
    damaged = tmp_path / "damaged.sqlite"
    run([src], tmp_path / "o4.jsonl", damaged)
    with sqlite3.connect(damaged) as db:
        db.execute("DROP TABLE recent")
    db.close()
    before = damaged.read_bytes()
    r = cli(capsys, "dedup", "--input", src, "--output", tmp_path / "o5.jsonl", "--store", damaged)
    assert r.returncode == 2 and "a damaged dedup store (no table 'recent')" in r.stderr, r.stderr
    assert damaged.read_bytes() == before and not (tmp_path / "o5.jsonl").exists()


def test_store_is_locked_while_a_run_holds_it(tmp_path):
    with DedupStore.open(tmp_path / "s.sqlite"):
        with pytest.raises(CpmctlError, match="in use by PID"):
            DedupStore.open(tmp_path / "s.sqlite")


def test_unreadable_shard_is_named_and_nothing_is_written(tmp_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", [para(1)])
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate data")
    r = cli(capsys, "dedup", "--input", good, "--input", bad, "--output", tmp_path / "o.jsonl", "--store", tmp_path / "s.sqlite")
    assert r.returncode == 2 and "b.jsonl.gz: unreadable" in r.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "s.sqlite").exists()


def test_normalization_option(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["今天天气不错，我们去公园。Hello World", "今天天气不错 我们去公园 hello world!"])
    assert run([src], tmp_path / "a.jsonl", tmp_path / "a.sqlite").kept == 2
    assert run([src], tmp_path / "b.jsonl", tmp_path / "b.sqlite", normalize=True).kept == 1


# ----- the membership filter in front of the store ----------------------------------------------------------------
def _batches(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(3)
    pool = [para(i) for i in range(600)]
    a = write_jsonl(tmp_path / "a.jsonl", ["\n".join(rng.choice(pool[:400]) for _ in range(rng.randint(1, 5)))
                                           for _ in range(500)])
    b = write_jsonl(tmp_path / "b.jsonl", ["\n".join(rng.choice(pool[200:]) for _ in range(rng.randint(1, 5)))
                                           for _ in range(500)])
    return a, b


def test_membership_filter_never_misses_a_known_paragraph(tmp_path):
    import numpy as np

    from cpmctl.data.membership import MembershipFilter

    rng = np.random.default_rng(0)
    f = MembershipFilter(0)
    added = rng.integers(-(2**63), 2**63 - 1, 3_000_000, dtype=np.int64)  # three times its capacity: still no miss
    f.add(added[:1_000_000])
    assert f.maybe(added[:1_000_000]).all()
    fresh = rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64)
    assert f.maybe(fresh).mean() < 0.015  # near capacity: about 1% of new paragraphs reach SQLite
    f.add(added[1_000_000:])
    assert f.full and f.maybe(added).all()
    # Through the store: every hash in its tables passes the filter, and `known` finds each exactly.
    a, b = _batches(tmp_path)
    run([a], tmp_path / "o1.jsonl", tmp_path / "s.sqlite")
    with DedupStore.open(tmp_path / "s.sqlite") as store:
        tables = [r[0] for r in store.conn.execute("SELECT hash FROM paragraphs UNION ALL SELECT hash FROM recent")]
        blobs = [np.frombuffer(b, dtype="<i8") for (b,) in store.conn.execute("SELECT hashes FROM pending")]
        stored = np.concatenate([np.array(tables, dtype=np.int64), *blobs])
        assert len(stored) == store.paragraph_count > 300 and store.membership.maybe(stored).all()
        probe = np.concatenate([stored, fresh[:1000]])
        assert store.known(probe) == set(stored.tolist())


def test_filter_rebuilt_while_the_store_grows_gives_the_same_result(tmp_path, monkeypatch):
    import cpmctl.data.membership
    import cpmctl.data.store

    a, b = _batches(tmp_path)
    run([a], tmp_path / "r1.jsonl", tmp_path / "ref.sqlite")
    run([b], tmp_path / "r2.jsonl", tmp_path / "ref.sqlite")
    monkeypatch.setattr(cpmctl.data.membership, "MIN_KEYS", 16)  # full after a few chunks: rebuilt, doubled
    monkeypatch.setattr(cpmctl.data.store, "MERGE_ROWS", 50)  # and `recent` merged often
    run([a], tmp_path / "o1.jsonl", tmp_path / "s.sqlite", chunk_bytes=2_000)
    run([b], tmp_path / "o2.jsonl", tmp_path / "s.sqlite", chunk_bytes=2_000)
    for name in ("1", "2"):
        assert (tmp_path / f"o{name}.jsonl").read_bytes() == (tmp_path / f"r{name}.jsonl").read_bytes()


def test_store_of_an_earlier_cpmctl_still_works(tmp_path):
    """A store written before the membership filter existed has the same tables and no sidecar or meta row."""
    from cpmctl.data.store import membership_path

    a, b = _batches(tmp_path)
    ref, old = tmp_path / "ref.sqlite", tmp_path / "old.sqlite"
    for store in (ref, old):
        run([a], tmp_path / f"{store.stem}-1.jsonl", store)
    membership_path(old).unlink()
    with sqlite3.connect(old) as db:
        db.execute("DELETE FROM meta WHERE key = 'membership'")
    db.close()
    warnings: list[str] = []
    r_ref = run([b], tmp_path / "ref-2.jsonl", ref)
    r_old = run([b], tmp_path / "old-2.jsonl", old, warn=warnings.append)
    assert (tmp_path / "old-2.jsonl").read_bytes() == (tmp_path / "ref-2.jsonl").read_bytes()
    assert r_old.duplicates == r_ref.duplicates > 0 and r_old.store_paragraphs == r_ref.store_paragraphs
    assert len(warnings) == 1 and "not there yet (a store of an earlier cpmctl); rebuilding it" in warnings[0]
    assert membership_path(old).exists()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "foreign", "earlier", "stale"])
def test_damaged_missing_or_stale_sidecar_is_rebuilt_never_trusted(tmp_path, damage):
    from cpmctl.data.store import membership_path

    a, b = _batches(tmp_path)
    store = tmp_path / "s.sqlite"
    run([a], tmp_path / "o1.jsonl", store)
    side = membership_path(store)
    good = side.read_bytes()
    if damage == "flipped":
        side.write_bytes(good[:-100] + bytes([good[-100] ^ 0x10]) + good[-99:])
    elif damage == "truncated":
        side.write_bytes(good[: len(good) // 2])
    elif damage == "missing":
        side.unlink()
    elif damage == "foreign":
        run([b], tmp_path / "x.jsonl", tmp_path / "other.sqlite")
        side.write_bytes(membership_path(tmp_path / "other.sqlite").read_bytes())
    else:  # the sidecar of before a later run: it lacks that run's paragraphs
        with sqlite3.connect(store) as db:
            record = db.execute("SELECT value FROM meta WHERE key = 'membership'").fetchone()[0]
        db.close()
        run([b], tmp_path / "o2.jsonl", store)
        side.write_bytes(good)
        if damage == "stale":  # as a run killed after its commits leaves it: meta still names the old sidecar
            with sqlite3.connect(store) as db:
                db.execute("UPDATE meta SET value = ? WHERE key = 'membership'", (record,))
            db.close()
        b = write_jsonl(tmp_path / "b-again.jsonl", kept_texts(tmp_path / "o2.jsonl"))  # all known by now
    warnings: list[str] = []
    r = run([b], tmp_path / "out.jsonl", store, warn=warnings.append)
    expected = {"flipped": "damaged", "truncated": "damaged", "missing": "missing", "foreign": "another store",
                "earlier": "an earlier state of it", "stale": "stale: saved at"}[damage]
    assert len(warnings) == 1 and expected in warnings[0] and "rebuilding it" in warnings[0], warnings
    if damage in ("earlier", "stale"):
        assert r.kept == 0 and r.duplicates == r.documents > 0  # a trusted stale filter would keep them all
    else:
        ref = tmp_path / "ref.sqlite"
        run([a], tmp_path / "ref1.jsonl", ref)
        run([b], tmp_path / "ref2.jsonl", ref)
        assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref2.jsonl").read_bytes()
    # Rebuilt and saved: the next run trusts it without a word.
    warnings.clear()
    run([b], tmp_path / "again.jsonl", store, warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize("crlf", [False, True])
def test_kept_lines_are_the_input_bytes_in_every_shard_layout(tmp_path, crlf):
    """Kept lines go out as slices of the block (one write per block): the same bytes and the same shard cuts
    as line-by-line writes, with blank and malformed lines between, and no newline after the last line."""
    rng = random.Random(3)
    pool = [para(i) for i in range(60)]
    lines = [json.dumps({"text": "\n".join(rng.sample(pool, rng.randint(1, 4))), "n": i}, ensure_ascii=False)
             for i in range(300)]
    lines[10:10] = ["", "{bad json"]
    sep = "\r\n" if crlf else "\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(sep.join(lines).encode())  # no final newline
    seen, want = set(), []
    for line in lines:
        if not line or line.startswith("{bad"):
            continue
        hs = {p for p in json.loads(line)["text"].split("\n")}
        if sum(h in seen for h in hs) >= required_seen(0.7, len(hs)):
            continue
        want.append(line.encode() + b"\n")
        seen |= hs
    assert 0 < len(want) < 300
    r = run([src], tmp_path / "out.jsonl", tmp_path / "s.sqlite", chunk_bytes=3_000)
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(want) and r.kept == len(want) and r.malformed == 1
    run([src], tmp_path / "dir", tmp_path / "s2.sqlite", chunk_bytes=3_000, shard_bytes=2_000)
    manifest = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    shards, at = [], 0
    for line in want:  # DocumentWriter.write's rule: a new shard once the current one holds shard_bytes
        if not shards or shards[-1][1] >= 2_000:
            shards.append([[], 0])
        shards[-1][0].append(line)
        shards[-1][1] += len(line)
    assert [s["documents"] for s in manifest["shards"]] == [len(s[0]) for s in shards]
    for info, (part, _) in zip(manifest["shards"], shards):
        assert (tmp_path / "dir" / info["name"]).read_bytes() == b"".join(part)


def test_vectorised_decisions_equal_the_one_by_one_rule():
    """decide() against the rule itself, on chunks where copies inside the chunk tip the balance either way."""
    from array import array

    import numpy as np

    from cpmctl.data.dedup import KEPT, HashedChunk, decide

    class Store:  # what decide asks of the store: which hashes it already holds
        def __init__(self, held):
            self.held = held

        def known_mask(self, hashes, ascending=False):
            assert not ascending or (np.diff(hashes) >= 0).all()
            return np.isin(hashes, np.array(sorted(self.held), dtype=np.int64))

    rng = random.Random(5)
    unsure = 0
    for trial in range(60):
        pool = list(range(rng.randint(5, 40)))
        held = set(rng.sample(pool, rng.randint(0, len(pool) // 2)))
        docs = [set(rng.sample(pool, rng.randint(1, min(6, len(pool))))) for _ in range(rng.randint(1, 50))]
        threshold = rng.choice([0.3, 0.5, 0.7, 1.0])
        chunk = HashedChunk(bytearray(b"p" * len(docs)), array("I", map(len, docs)),
                            array("q", [h for d in docs for h in d]))
        codes, added = decide(chunk, Store(held), threshold)
        seen, want, new = set(held), [], set()
        for d in docs:
            dup = sum(h in seen for h in d) >= required_seen(threshold, len(d))
            want.append(not dup)
            if not dup:
                new |= d - seen
                seen |= d
        assert [c == KEPT for c in codes] == want
        assert added.tolist() == sorted(new)
        for i, d in enumerate(docs):  # neither the store alone nor every earlier copy counted decides it
            need, earlier = required_seen(threshold, len(d)), set().union(*docs[:i])
            unsure += sum(h in held for h in d) < need <= sum(h in held or h in earlier for h in d)
    assert unsure > 100  # so the one-by-one path ran


def test_hash_runs_are_an_exact_set_in_few_sorted_runs():
    import numpy as np

    from cpmctl.data.membership import HashRuns

    rng = np.random.default_rng(2)
    runs, held = HashRuns(), set()
    for size in rng.integers(1, 3000, 80):
        batch = rng.integers(-(2**63), 2**63 - 1, int(size), dtype=np.int64)
        runs.add(batch)
        held.update(batch.tolist())
        assert len(runs.runs) <= int(np.log2(len(held))) + 1
    probe = np.concatenate([np.array(sorted(held)[::7]), rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)])
    assert runs.contains(probe).tolist() == [h in held for h in probe.tolist()]
    assert sorted(np.concatenate(runs.runs).tolist()) == sorted(held) and len(runs) == len(held)


def test_a_version_1_store_is_upgraded_and_gives_the_same_result(tmp_path):
    a, b = _batches(tmp_path)
    ref, old = tmp_path / "ref.sqlite", tmp_path / "old.sqlite"
    for store in (ref, old):
        run([a], tmp_path / f"{store.stem}-1.jsonl", store)
    with sqlite3.connect(old) as db:  # what cpmctl wrote before the `pending` table: every paragraph in a table
        for (blob,) in db.execute("SELECT hashes FROM pending").fetchall():
            db.executemany("INSERT INTO recent VALUES (?)", ((h,) for h in array("q", blob).tolist()))
        db.execute("DROP TABLE pending")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    db.close()
    run([b], tmp_path / "ref-2.jsonl", ref)
    run([b], tmp_path / "old-2.jsonl", old)
    assert (tmp_path / "old-2.jsonl").read_bytes() == (tmp_path / "ref-2.jsonl").read_bytes()
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0] == "2"
        assert db.execute("SELECT count(*) FROM pending").fetchone()[0] >= 1  # the second run's chunks, unmerged
    db.close()
