"""The bundled demo data: it loads, it is what the generator writes, and the manifest tells the truth about it."""

from __future__ import annotations

import json
import re

import pytest

from cpmctl.assets import ASSETS_DIR, asset_path
from tools.assets import make_assets

CORPUS = ASSETS_DIR / "corpus"
TASK = ASSETS_DIR / "tasks" / "lcsts-mini"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus():
    return {name: read_jsonl(CORPUS / name) for name in ("batch1.jsonl", "batch2.jsonl")}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


def paragraphs(text: str) -> list[str]:
    return text.split("\n")


def test_files_load_and_sizes_are_within_limits(corpus):
    batch1_bytes = (CORPUS / "batch1.jsonl").stat().st_size
    assert 1.5e6 <= batch1_bytes <= 4e6
    assert (CORPUS / "batch2.jsonl").stat().st_size < 0.5e6
    for rows in corpus.values():
        assert all(set(r) == {"id", "text"} and r["text"] for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
    sizes = {split: len(read_jsonl(TASK / f"{split}.jsonl")) for split in ("train", "dev", "test")}
    assert sizes == {"train": 400, "dev": 60, "test": 60}
    assert asset_path("corpus/blocked_words.txt").read_text(encoding="utf-8").split() == make_assets.junk.BLOCKED_WORDS


def test_committed_files_are_what_the_generator_writes(tmp_path):
    make_assets.write_all(tmp_path)
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            committed = ASSETS_DIR / path.relative_to(tmp_path)
            assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: rerun make_assets"


def test_manifest_counts_match_the_files(corpus, manifest):
    for name, rows in corpus.items():
        ids = {r["id"] for r in rows}
        entries = [e for e in manifest["documents"] if e["file"] == name]
        assert {e["id"] for e in entries} <= ids
        summary = manifest["files"][name]
        assert summary["documents"] == len(rows)
        assert summary["good"] + sum(summary["planted"].values()) == len(rows)
        dropped = sum(e["expect"] == "drop" for e in entries)
        assert summary["expected_kept"] == len(rows) - dropped
    batch1 = manifest["files"]["batch1.jsonl"]
    junk_share = sum(batch1["planted"].values()) / batch1["documents"]
    assert 0.10 <= junk_share <= 0.20


def test_duplicates_are_exactly_as_planted(corpus, manifest):
    """Replays the paragraph-hash dedup rule on the files: the planted duplicates, and only they, are dropped."""
    dropped = {e["id"] for e in manifest["documents"] if e["expect"] == "drop" and e["stage"] != "dedup"}
    expected = {e["id"] for e in manifest["documents"] if e["stage"] == "dedup" and e["expect"] == "drop"}
    store: set[str] = set()
    got = set()
    for name in ("batch1.jsonl", "batch2.jsonl"):  # one store across both batches
        for row in corpus[name]:
            if row["id"] in dropped:
                continue
            paras = [p.strip() for p in paragraphs(row["text"]) if p.strip()]
            if sum(p in store for p in paras) / len(paras) >= 0.7:
                got.add(row["id"])
            else:
                store.update(paras)
    assert got == expected

    text = {r["id"]: r["text"] for rows in corpus.values() for r in rows}
    order = {r["id"]: i for i, r in enumerate(corpus["batch1.jsonl"])}
    for e in manifest["documents"]:
        if "source_id" not in e:
            continue
        doc, src = paragraphs(text[e["id"]]), paragraphs(text[e["source_id"]])
        shared = sum(p in set(src) for p in doc) / len(doc)
        assert shared == pytest.approx(e["shared_fraction"], abs=1e-3)
        if e["category"] == "exact_duplicate":
            assert text[e["id"]] == text[e["source_id"]]
        if e["file"] == "batch1.jsonl":
            assert order[e["source_id"]] < order[e["id"]]


def test_filter_plants_carry_what_they_claim(corpus, manifest):
    text = {r["id"]: r["text"] for r in corpus["batch1.jsonl"]}
    planted = {e["id"]: e for e in manifest["documents"] if e["file"] == "batch1.jsonl"}
    blocked = make_assets.junk.BLOCKED_WORDS
    control = re.compile(r"[\x00-\x08\x0b-\x1f\u200b\ufeff\xa0\u3000\t]")
    for doc_id, body in text.items():
        e = planted.get(doc_id, {"category": "good"})
        category = e["category"]
        assert any(w in body for w in blocked) == (category == "blocked_word"), doc_id
        assert bool(control.search(body) or "\r" in body) == (category == "odd_characters"), doc_id
        if category == "blocked_word":
            assert e["word"] in body
        if category == "too_short":
            assert len(body) < 20
        if category == "boilerplate_lines":
            lines = paragraphs(body)
            assert all(line in lines for line in e["boilerplate"])
            assert len(lines) - len(e["boilerplate"]) >= 3  # the article itself is still there
        if category == "odd_characters":
            cleaned = re.sub(r"[\x00-\x08\x0b-\x1f\u200b\ufeff]", "", body.replace("\r\n", "\n"))
            cleaned = "\n".join(p.strip() for p in cleaned.split("\n") if p.strip())
            assert cleaned == e["clean_text"]
        if category in ("english", "code", "symbols"):
            han = sum("\u4e00" <= ch <= "\u9fff" for ch in body)
            assert han / len(body) < 0.05
        if category == "good":
            assert len(body) >= 80


def test_task_targets_are_extractive_headlines():
    for split in ("train", "dev", "test"):
        for row in read_jsonl(TASK / f"{split}.jsonl"):
            assert set(row) == {"input", "target"}
            assert 4 <= len(row["target"]) <= 20 and 50 <= len(row["input"]) <= 200
            first_sentence = row["input"].split("。")[0]
            assert set(row["target"]) <= set(first_sentence)
    inputs = [r["input"] for s in ("train", "dev", "test") for r in read_jsonl(TASK / f"{s}.jsonl")]
    assert len(set(inputs)) == len(inputs)


def test_the_original_vocabulary_covers_the_good_text(ant_vocab, corpus, manifest):
    from cpmctl.model.tokenizer import UNK, CPMAntTokenizer

    tok = CPMAntTokenizer(ant_vocab)
    planted = {e["id"] for e in manifest["documents"]}
    good = [r["text"] for r in corpus["batch2.jsonl"] if r["id"] not in planted]
    task = [r["input"] + r["target"] for r in read_jsonl(TASK / "test.jsonl")]
    for text in good + task:
        assert UNK not in tok.encode(text), text[:40]
