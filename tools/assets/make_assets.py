"""Rebuild cpmctl's bundled demo data (cpmctl/assets/) from the templates in templates.py and junk.py
(deterministic, seeded). Only the output ships in the package; these generators stay in the repository.

    python -m tools.assets.make_assets                 # rewrite corpus/ and tasks/ beside this file
    python -m tools.assets.make_assets --out DIR       # write them under DIR instead
    python -m tools.assets.make_assets --stats --vocab ../shared/reference/ant.txt   # sizes, <unk>, entropy

Outputs:
  corpus/batch1.jsonl       the main corpus: good documents plus planted junk, {"id", "text"} per line
  corpus/batch2.jsonl       a second batch sharing paragraphs with batch1 (the dedup store must persist)
  corpus/blocked_words.txt  made-up spam words for the user block list
  corpus/manifest.json      every planted document: its category, what should happen to it and why
  tasks/lcsts-mini/{train,dev,test}.jsonl   {"input", "target"}: news item -> headline
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from tools.assets import junk
from tools.assets.templates import TOPICS, _name, news_parts

SEED = 20240917
ASSETS = Path(__file__).resolve().parents[2] / "cpmctl" / "assets"  # the package data these generate

# Documents per topic in batch1 (news-like text gets the most: it is what lcsts-mini summarizes).
TOPIC_COUNTS = {"weather": 280, "cooking": 260, "travel": 250, "school": 250, "work": 230, "science": 220,
                "city_life": 250, "sports": 230, "history": 200, "news": 380, "news_digest": 180}
BATCH2_CLEAN = 200
# Planted documents in batch1 (see the manifest for each one).
PLANT = {"exact_duplicate": 50, "near_duplicate_drop": 50, "near_duplicate_keep": 30, "boilerplate_lines": 40,
         "boilerplate_page": 25, "too_short": 30, "english": 25, "code": 12, "symbols": 25, "repeated_lines": 18,
         "repeated_ngram": 12, "repeated_paragraph": 12, "odd_characters": 30, "blocked_word": 24}
# Batch2's planted documents refer to batch1 documents.
PLANT_BATCH2 = {"exact_duplicate": 10, "near_duplicate_drop": 20, "near_duplicate_keep": 12}
TASK_SPLITS = {"train": 400, "dev": 60, "test": 60}

# What each category expects from the pipeline (filter, then dedup with the persistent paragraph store).
EXPECT = {
    "exact_duplicate": ("drop", "dedup", "identical text to an earlier document"),
    "near_duplicate_drop": ("drop", "dedup", ">= 70% of its paragraphs are already in the store"),
    "near_duplicate_keep": ("keep", "dedup", "only ~50% of its paragraphs are in the store: must survive"),
    "boilerplate_lines": ("keep", "filter:boilerplate", "good article; its navigation/footer lines are removed"),
    "boilerplate_page": ("drop", "filter:boilerplate", "nothing but navigation, link lists and footers"),
    "too_short": ("drop", "filter:short", "under 20 characters"),
    "english": ("drop", "filter:non_chinese", "English text with a stray Chinese word"),
    "code": ("drop", "filter:non_chinese", "markup, code and URLs left over from scraping"),
    "symbols": ("drop", "filter:symbols", "symbol and digit junk"),
    "repeated_lines": ("drop", "filter:repetition", "one line repeated 12-30 times"),
    "repeated_ngram": ("drop", "filter:repetition", "a short n-gram repeated dozens of times"),
    "repeated_paragraph": ("drop", "filter:repetition", "one paragraph pasted 5-8 times"),
    "odd_characters": ("keep", "filter:normalize",
                       "good article with control characters and odd whitespace; normalized it equals clean_text"),
    "blocked_word": ("drop", "filter:blocked_words", "contains a word from blocked_words.txt"),
}


_UNIT = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9]+")


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's units (CJK characters, ASCII words) inside n-grams that occur more than once
    (the Gopher repetition measure, with characters as the units of Chinese)."""
    units = _UNIT.findall(text)
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(units)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    total = sum(map(len, units)) or 1
    return sum(len(u) for u, c in zip(units, covered) if c) / total


def repetitive(paragraphs: list[str]) -> bool:
    """A good document stays well under Gopher's duplicate n-gram limits (0.15 for 5-grams ... 0.10 for 10-grams),
    so that a repetition filter has no reason to drop it."""
    text = "\n".join(paragraphs)
    return any(repeated_ngram_share(text, n) > 0.8 * limit
               for n, limit in zip(range(5, 11), (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)))


class CleanDocs:
    """Good documents whose paragraphs are all distinct from every other document's: only the planted
    duplicates share paragraphs, so the dedup counts in the manifest are exact."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.seen: set[str] = set()  # membership only

    def make(self, topic: str) -> list[str]:
        for _ in range(200):
            paragraphs = TOPICS[topic](self.rng)
            unique = len(set(paragraphs)) == len(paragraphs) and not any(p in self.seen for p in paragraphs)
            if unique and not repetitive(paragraphs):
                self.seen.update(paragraphs)
                return paragraphs
        raise RuntimeError(f"the {topic} templates cannot produce another unique document")

    def fresh_paragraphs(self, topic: str, n: int) -> list[str]:
        """n new body paragraphs of a topic (the first line of a document is its title)."""
        out: list[str] = []
        while len(out) < n:
            out += self.make(topic)[1:]
        return out[:n]


def shared_fraction(paragraphs: list[str], source: list[str]) -> tuple[float, float]:
    """Fraction of paragraphs found in the source, counting the title line and not counting it."""
    src = set(source)
    with_title = sum(p in src for p in paragraphs) / len(paragraphs)
    body = paragraphs[1:]
    return with_title, sum(p in src for p in body) / len(body)


REPOST_NOTES = ["写得很实在，我们那里也是这样。", "转给家里人看看。", "这篇文章值得收藏。", "看完很有感触，谢谢作者。",
                "希望多发一些这样的内容。", "原来是这样，长知识了。", "我也去过，确实不错。", "支持，说得很有道理。"]


def repost_note(rng: random.Random, gen: CleanDocs) -> str:
    """A reader's comment added by a reposting site: the new paragraph of a near-duplicate."""
    while True:
        note = f"网友{_name(rng)}留言：{rng.choice(REPOST_NOTES)}"
        if note not in gen.seen:
            gen.seen.add(note)
            return note


def near_duplicate(rng: random.Random, gen: CleanDocs, source: list[str], keep: bool):
    """A repost of `source`: >= 75% of its paragraphs shared (dropped) or ~50% shared (kept), whether or not a
    dedup counts the title line. Like the good documents, it is not repetitive within itself."""
    for _ in range(100):
        if not keep:
            doc = list(source)
            if rng.random() < 0.5:
                doc.append(repost_note(rng, gen))  # a comment appended
            else:
                doc[rng.randint(2, len(source) - 1)] = repost_note(rng, gen)  # a paragraph swapped for a comment
        else:
            # half of the body under a new title, interleaved with paragraphs of an article on another topic
            k = (len(source) - 1) // 2
            other = gen.make(rng.choice([t for t in TOPICS if t not in ("news", "news_digest")]))
            copied = rng.sample(source[1:], k)
            doc = [other[0]] + [p for pair in zip(copied, other[1:]) for p in pair]
        if not repetitive(doc):
            break
    else:
        raise RuntimeError("cannot build a non-repetitive near-duplicate")
    fractions = shared_fraction(doc, source)
    assert (min(fractions) >= 0.75) if not keep else (max(fractions) <= 0.6), fractions
    return doc, round(fractions[0], 3)


def plant_batch1(rng: random.Random, gen: CleanDocs, docs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Plant junk among `docs` (the good ones, each {"paras", "topic"}): new documents are added and some good
    ones are edited in place; each planted one gets a "plant" entry. Returns (all documents, the good documents
    that batch2 will duplicate). Sources of duplicates are never edited."""
    n_sources = PLANT["exact_duplicate"] + PLANT["near_duplicate_drop"] + PLANT["near_duplicate_keep"]
    n_edits = PLANT["boilerplate_lines"] + PLANT["odd_characters"] + PLANT["blocked_word"]
    order = rng.sample(range(len(docs)), len(docs))
    sources = [docs[i] for i in order if len(docs[i]["paras"]) >= 5][: n_sources + sum(PLANT_BATCH2.values())]
    chosen = {id(d) for d in sources}
    edited = [docs[i] for i in order if id(docs[i]) not in chosen][:n_edits]
    picks, edits = iter(sources[:n_sources]), iter(edited)
    out = list(docs)

    def add(paras, category, **extra):
        out.append({"paras": paras, "plant": {"category": category, **extra}})

    for _ in range(PLANT["exact_duplicate"]):
        src = next(picks)
        add(list(src["paras"]), "exact_duplicate", source=src, shared_fraction=1.0)
    for category in ("near_duplicate_drop", "near_duplicate_keep"):
        for _ in range(PLANT[category]):
            src = next(picks)
            paras, frac = near_duplicate(rng, gen, src["paras"], keep=category.endswith("keep"))
            add(paras, category, source=src, shared_fraction=frac)
    for _ in range(PLANT["boilerplate_lines"]):
        d = next(edits)
        d["paras"], lines = junk.add_boilerplate_lines(rng, d["paras"])
        d["plant"] = {"category": "boilerplate_lines", "boilerplate": lines}
    for _ in range(PLANT["odd_characters"]):
        d = next(edits)
        d["text"], injected = junk.add_odd_characters(rng, d["paras"])
        d["plant"] = {"category": "odd_characters", "injected": injected, "clean_text": "\n".join(d["paras"])}
    for _ in range(PLANT["blocked_word"]):
        d = next(edits)
        d["paras"], word = junk.add_spam(rng, d["paras"])
        d["plant"] = {"category": "blocked_word", "word": word}

    headlines = [d["paras"][0] for d in docs[:200]]
    for _ in range(PLANT["boilerplate_page"]):
        add(junk.boilerplate_page(rng, headlines), "boilerplate_page")
    for i in range(PLANT["too_short"]):
        add(junk.too_short(rng, i), "too_short")
    for _ in range(PLANT["english"]):
        add(junk.english(rng), "english")
    for _ in range(PLANT["code"]):
        add(junk.code(rng), "code")
    for _ in range(PLANT["symbols"]):
        add(junk.symbols(rng), "symbols")
    for category, kind in (("repeated_lines", "lines"), ("repeated_ngram", "ngram"), ("repeated_paragraph", "paragraph")):
        for _ in range(PLANT[category]):
            add(junk.repetition(rng, kind, gen.fresh_paragraphs("news", 1)[0]), category)
    return out, sources[n_sources:]


def order_sources_first(rng: random.Random, docs: list[dict]) -> list[dict]:
    """Shuffle, then make every duplicate come after its source (dedup keeps the first one it sees)."""
    rng.shuffle(docs)
    position = {id(d): i for i, d in enumerate(docs)}
    for d in list(docs):
        src = d.get("plant", {}).get("source")
        if src is not None and position[id(src)] > position[id(d)]:
            a, b = position[id(d)], position[id(src)]
            docs[a], docs[b] = docs[b], docs[a]
            position[id(d)], position[id(src)] = b, a
    return docs


def text_of(doc: dict) -> str:
    return doc.get("text") or "\n".join(doc["paras"])


def build_corpus(seed: int = SEED):
    rng = random.Random(f"{seed}-corpus")
    gen = CleanDocs(rng)
    good = [{"paras": gen.make(topic), "topic": topic} for topic, n in TOPIC_COUNTS.items() for _ in range(n)]
    batch1, batch2_sources = plant_batch1(rng, gen, good)
    batch1 = order_sources_first(rng, batch1)
    for i, d in enumerate(batch1, 1):
        d["id"] = f"b1-{i:05d}"

    sources = iter(batch2_sources)
    topics = list(TOPIC_COUNTS)
    batch2 = [{"paras": gen.make(topics[i % len(topics)])} for i in range(BATCH2_CLEAN)]
    for category, n in PLANT_BATCH2.items():
        for _ in range(n):
            src = next(sources)
            if category == "exact_duplicate":
                paras, frac = list(src["paras"]), 1.0
            else:
                paras, frac = near_duplicate(rng, gen, src["paras"], keep=category.endswith("keep"))
            batch2.append({"paras": paras, "plant": {"category": category, "source": src, "shared_fraction": frac}})
    rng.shuffle(batch2)
    for i, d in enumerate(batch2, 1):
        d["id"] = f"b2-{i:05d}"
    return batch1, batch2


def manifest_entries(docs: list[dict], file: str) -> list[dict]:
    entries = []
    for d in docs:
        plant = d.get("plant")
        if plant is None:
            continue
        expect, stage, why = EXPECT[plant["category"]]
        entry = {"id": d["id"], "file": file, "category": plant["category"], "expect": expect, "stage": stage,
                 "why": why}
        for key, value in plant.items():
            if key == "source":
                entry["source_id"] = value["id"]
            elif key != "category":
                entry[key] = value
        if file == "batch2.jsonl" and stage == "dedup":
            entry["why"] += " (the store must persist from batch1: a fresh store keeps it)"
        entries.append(entry)
    return entries


def summary(docs: list[dict], batch2: bool = False) -> dict:
    categories = Counter(d["plant"]["category"] for d in docs if "plant" in d)
    dropped_filter = sum(n for c, n in categories.items() if EXPECT[c][0] == "drop" and EXPECT[c][1] != "dedup")
    dropped_dedup = sum(n for c, n in categories.items() if EXPECT[c][0] == "drop" and EXPECT[c][1] == "dedup")
    out = {"documents": len(docs), "good": len(docs) - sum(categories.values()), "planted": dict(sorted(categories.items())),
           "expected_dropped_by_filter": dropped_filter, "expected_dropped_by_dedup": dropped_dedup,
           "expected_kept": len(docs) - dropped_filter - dropped_dedup}
    if batch2:
        out["expected_kept_with_fresh_store"] = len(docs) - dropped_filter
    return out


def build_task(seed: int = SEED) -> dict[str, list[dict]]:
    """lcsts-mini: a short news item -> its headline (city + organisation + event, all from the first sentence)."""
    rng = random.Random(f"{seed}-lcsts")
    seen: set[str] = set()
    splits = {}
    for split, n in TASK_SPLITS.items():
        rows = []
        while len(rows) < n:
            headline, first, detail, extra, _ = news_parts(rng)
            text = first + "".join(detail) + extra[0] + (extra[1] if rng.random() < 0.4 else "")
            if text in seen:
                continue
            seen.add(text)
            rows.append({"input": text, "target": headline})
        splits[split] = rows
    return splits


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(out: Path, seed: int = SEED) -> None:
    batch1, batch2 = build_corpus(seed)
    corpus = out / "corpus"
    write_jsonl(corpus / "batch1.jsonl", ({"id": d["id"], "text": text_of(d)} for d in batch1))
    write_jsonl(corpus / "batch2.jsonl", ({"id": d["id"], "text": text_of(d)} for d in batch2))
    (corpus / "blocked_words.txt").write_text("\n".join(junk.BLOCKED_WORDS) + "\n", encoding="utf-8")
    manifest = {
        "generator": "cpmctl/assets/make_assets.py",
        "seed": seed,
        "pipeline": "filter (with --blocked-words corpus/blocked_words.txt) -> dedup (paragraph = one '\\n'-separated "
                    "line; a document is a duplicate when >= 70% of its paragraph hashes are already in the store); "
                    "batch2 is deduplicated against the store left by batch1",
        "files": {"batch1.jsonl": summary(batch1), "batch2.jsonl": summary(batch2, batch2=True)},
        "categories": {c: {"expect": e, "stage": s, "why": w} for c, (e, s, w) in EXPECT.items()},
        "documents": manifest_entries(batch1, "batch1.jsonl") + manifest_entries(batch2, "batch2.jsonl"),
    }
    (corpus / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for split, rows in build_task(seed).items():
        write_jsonl(out / "tasks" / "lcsts-mini" / f"{split}.jsonl", rows)


# ----------------------------------------------------------------------------------------------------------------
# Statistics for the README: sizes, <unk> rate and unigram entropy under a CPM-Ant vocabulary
# ----------------------------------------------------------------------------------------------------------------


def entropy(counts: Counter) -> float:
    """Unigram entropy in nats."""
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def heldout_cross_entropy(train: list[list[int]], test: list[list[int]], vocab_size: int) -> tuple[float, float]:
    """Held-out cross-entropy (nats/token) of an add-one unigram model and of an interpolated bigram model
    (0.7 bigram + 0.3 unigram): how much of the text is predictable from the previous token alone."""
    uni, bi, ctx = Counter(), Counter(), Counter()
    for ids in train:
        uni.update(ids)
        bi.update(zip(ids, ids[1:]))
        ctx.update(ids[:-1])
    total = sum(uni.values())
    p_uni = lambda t: (uni[t] + 1) / (total + vocab_size)  # noqa: E731
    h_uni = h_bi = 0.0
    n = 0
    for ids in test:
        for prev, t in zip(ids, ids[1:]):
            pu = p_uni(t)
            pb = bi[(prev, t)] / ctx[prev] if ctx[prev] else 0.0
            h_uni -= math.log(pu)
            h_bi -= math.log(0.7 * pb + 0.3 * pu)
            n += 1
    return h_uni / n, h_bi / n


def stats(root: Path, vocab: Path) -> dict:
    from cpmctl.model.tokenizer import UNK, CPMAntTokenizer

    tok = CPMAntTokenizer(vocab)
    manifest = json.loads((root / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    dropped = {e["id"] for e in manifest["documents"] if e["expect"] == "drop"}
    report = {"vocab": str(vocab), "files": {}}
    for path in sorted(root.glob("**/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [r.get("text") or r["input"] + r["target"] for r in rows]
        ids = [tok.encode(t) for t in texts]
        n_tok = sum(map(len, ids))
        n_unk = sum(i.count(UNK) for i in ids)
        report["files"][str(path.relative_to(root))] = {
            "bytes": path.stat().st_size, "rows": len(rows), "chars": sum(map(len, texts)), "tokens": n_tok,
            "unk": n_unk, "unk_rate": round(n_unk / n_tok, 5)}
        if path.name == "batch1.jsonl":
            kept = [i for r, i in zip(rows, ids) if r["id"] not in dropped]
            kept_text = [t for r, t in zip(rows, texts) if r["id"] not in dropped]
            counts = Counter(t for i in kept for t in i)
            chars = sum(map(len, kept_text))
            h = entropy(counts)
            split = len(kept) * 9 // 10
            ce_uni, ce_bi = heldout_cross_entropy(kept[:split], kept[split:], tok.vocab_size)
            report["batch1_after_filter_and_dedup"] = {
                "documents": len(kept), "tokens": sum(counts.values()), "chars": chars,
                "distinct_tokens": len(counts), "distinct_chars": len(set("".join(kept_text))),
                "unigram_entropy_nats_per_token": round(h, 4),
                "unigram_entropy_bits_per_token": round(h / math.log(2), 4),
                "unigram_entropy_bits_per_char": round(h / math.log(2) * sum(counts.values()) / chars, 4),
                "char_unigram_entropy_bits_per_char": round(entropy(Counter("".join(kept_text))) / math.log(2), 4),
                "heldout_unigram_ce_nats_per_token": round(ce_uni, 4),
                "heldout_bigram_ce_nats_per_token": round(ce_bi, 4),
            }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="where corpus/ and tasks/ are written")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--stats", action="store_true", help="print statistics of the files under --out instead")
    parser.add_argument("--vocab", type=Path, help="vocabulary for --stats (the original ant.txt)")
    args = parser.parse_args(argv)
    if args.stats:
        if args.vocab is None:
            parser.error("--stats needs --vocab")
        print(json.dumps(stats(args.out, args.vocab), ensure_ascii=False, indent=1))
    else:
        write_all(args.out, args.seed)


if __name__ == "__main__":
    main()
