"""Tokenizer speed: cpmctl's CPMAntTokenizer against a naive implementation of the original algorithm (CPM-Live
cpm_live/tokenizers/ant.py: jieba.cut with HMM, then for each piece a greedy longest match that starts at the end
of the piece, no memo). Both must produce the same ids; the script checks it, then prints tokens/s and the ratio.

jieba's segmentation dominates both; cpmctl memoises it per block (jieba segments the runs of Chinese characters
and letters between punctuation independently), so its first pass gains with the corpus's repetition, printed as
the share of block characters that are first occurrences. The warm pass (same corpus again) only shows the memo.

    python bench/tokenizer.py                                   # the bundled demo corpus, ant.txt from ../shared
    python bench/tokenizer.py --corpus my.jsonl --vocab ant.txt --docs 5000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpmctl.model.tokenizer import CPMAntTokenizer  # noqa: E402

DEFAULT_VOCAB = ROOT.parent / "shared" / "reference" / "ant.txt"
DEFAULT_CORPUS = ROOT / "cpmctl" / "assets" / "corpus" / "batch1.jsonl"


class NaiveTokenizer:
    """The original algorithm, written plainly."""

    def __init__(self, vocab_path: Path):
        import jieba

        self.jieba = jieba
        self.encoder: dict[str, int] = {}
        for line in vocab_path.read_text(encoding="utf-8").splitlines():
            token = line.strip()
            if token:
                self.encoder[token] = len(self.encoder)
        self.encoder[" "] = self.encoder.pop("</_>")
        self.encoder["\n"] = self.encoder.pop("</n>")
        self.unk = self.encoder["<unk>"]

    def match(self, piece: str) -> list[int]:
        if len(piece) > 200:
            return [self.unk]
        ids, start = [], 0
        while start < len(piece):
            end = len(piece)
            while end > start and piece[start:end] not in self.encoder:
                end -= 1
            if end == start:
                ids.append(self.unk)
                start += 1
            else:
                ids.append(self.encoder[piece[start:end]])
                start = end
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for piece in self.jieba.cut(text, cut_all=False) for i in self.match(piece)]


def read_corpus(path: Path, limit: int) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            texts.append(json.loads(line)["text"] if path.suffix == ".jsonl" else line.replace("<n>", "\n"))
            if len(texts) >= limit:
                break
    return texts


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="jsonl with a 'text' field, or plain text lines.")
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.vocab.exists():
        raise SystemExit(f"vocab not found: {args.vocab} (pass --vocab ant.txt)")

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    texts = read_corpus(args.corpus, args.docs)
    chars = sum(map(len, texts))
    seen, fresh = set(), 0
    for text in texts:
        for block in jieba.re_han_default.split(text):
            if block and block not in seen:
                seen.add(block)
                fresh += len(block)
    naive = NaiveTokenizer(args.vocab)

    t_jieba, _ = best_time(lambda: [list(jieba.cut(t, cut_all=False)) for t in texts], args.repeats)
    t_naive, ids_naive = best_time(lambda: [naive.encode(t) for t in texts], args.repeats)
    # A fresh tokenizer per run: the first pass over the corpus fills the memo; both passes are reported.
    cold, warm = float("inf"), float("inf")
    for _ in range(args.repeats):
        ours = CPMAntTokenizer(args.vocab)
        t, ids_ours = best_time(lambda: [ours.encode(t) for t in texts], 1)
        cold = min(cold, t)
        t, _ = best_time(lambda: [ours.encode(t) for t in texts], 1)
        warm = min(warm, t)
    same = ids_ours == ids_naive
    tokens = sum(map(len, ids_ours))
    print(f"corpus: {len(texts)} documents, {chars:,} characters, {tokens:,} tokens ({args.corpus.name}); "
          f"vocab {args.vocab.name}; first-occurrence block characters {fresh / chars:.0%}")
    print(f"jieba alone        {chars / t_jieba:12,.0f} chars/s")
    print(f"naive original     {tokens / t_naive:12,.0f} tokens/s")
    print(f"cpmctl first pass  {tokens / cold:12,.0f} tokens/s  ratio {t_naive / cold:.2f}x")
    print(f"cpmctl warm memo   {tokens / warm:12,.0f} tokens/s  ratio {t_naive / warm:.2f}x")
    print(f"same ids: {'yes' if same else 'NO'}")
    if args.json:
        print(json.dumps({"docs": len(texts), "tokens": tokens, "naive_tokens_per_s": round(tokens / t_naive),
                          "cpmctl_cold_tokens_per_s": round(tokens / cold), "cpmctl_warm_tokens_per_s": round(tokens / warm),
                          "ratio_cold": round(t_naive / cold, 3), "ratio_warm": round(t_naive / warm, 3), "same_ids": same}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
