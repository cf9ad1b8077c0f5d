"""Synthetic packed data with learnable structure, for tests, benchmarks and smoke runs without a corpus.

Documents come from a sparse Markov chain (each token has a few likely successors), so a model that learns the
transitions drops far below the unigram entropy. Records are built as the original pretraining builds them
(shared/reference/cpm-ant.md section 7): 32 prompt slots of task 2 (lm) or 1 (mlm), then [<s>] + piece + [</s>];
an lm record predicts a random-length suffix, an mlm record random positions (tokens are not replaced);
tgt[i] = token[i+1] where context[i+1] is False. Records are packed into rows with distinct spans.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cpmctl.data.packed import IGNORE, PackedWriter

BOS, EOS, FIRST_WORD = 6, 7, 10  # ids of <s>, </s>, and the first non-special token in every CPM-Ant vocab
PROMPT_LENGTH = 32
TASK_MLM, TASK_LM = 1, 2


def markov_documents(vocab_size: int, num_docs: int, doc_length: int, seed: int = 0, successors: int = 4,
                     words: int | None = None, chain_seed: int = 0) -> list[np.ndarray]:
    """Token documents sampled (seed) from a random sparse Markov chain (chain_seed) over `words` token ids
    (default: all non-special ones). Train and validation sets share the chain and differ in the seed."""
    chain = np.random.default_rng(chain_seed)
    words = min(words or vocab_size - FIRST_WORD, vocab_size - FIRST_WORD)
    nexts = chain.integers(0, words, size=(words, successors))
    probs = chain.dirichlet(np.full(successors, 0.5), size=words)
    rng = np.random.default_rng([seed, 1])
    docs = []
    for _ in range(num_docs):
        doc = np.empty(doc_length, dtype=np.int64)
        state = int(rng.integers(words))
        choices = rng.random(doc_length)
        for i in range(doc_length):
            doc[i] = state + FIRST_WORD
            state = int(nexts[state, np.searchsorted(np.cumsum(probs[state]), choices[i]).clip(max=successors - 1)])
        docs.append(doc)
    return docs


def make_record(piece: np.ndarray, task: int, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One training instance: prompt slots, [<s>] + piece + [</s>], context mask and next-token targets."""
    text = np.concatenate([[BOS], piece, [EOS]])
    n = PROMPT_LENGTH + len(text)
    ids = np.concatenate([vocab_size + PROMPT_LENGTH * task + np.arange(PROMPT_LENGTH), text])
    context = np.ones(n, dtype=bool)
    if task == TASK_LM:
        start = PROMPT_LENGTH + 1 + int(rng.integers(0, len(text) - 1))  # predict a random-length suffix
        context[start:] = False
    else:
        predicted = rng.random(len(text)) < rng.uniform(0.1, 0.5)
        predicted[0] = False  # <s> is always given
        context[PROMPT_LENGTH:] = ~predicted
    target = np.full(n, IGNORE, dtype=np.int64)
    target[:-1] = np.where(~context[1:], ids[1:], IGNORE)
    segment = np.concatenate([np.zeros(PROMPT_LENGTH, np.int64), np.full(len(text), 2 if task == TASK_LM else 1)])
    return {"input": ids, "target": target, "segment": segment, "context": context, "task": np.full(n, task)}


def pack_rows(records: list[dict], max_length: int) -> list[dict[str, np.ndarray]]:
    """First-fit packing in order; each record gets its own span, padding the last span of the row."""
    rows, current, used = [], [], 0
    for rec in records:
        size = len(rec["input"])
        if size > max_length:
            raise ValueError(f"record of {size} tokens does not fit a row of {max_length}")
        if used + size > max_length:
            rows.append(_row(current, max_length))
            current, used = [], 0
        current.append(rec)
        used += size
    if current:
        rows.append(_row(current, max_length))
    return rows


def _row(records: list[dict], max_length: int) -> dict[str, np.ndarray]:
    row = {"input": np.zeros(max_length, np.int64), "target": np.full(max_length, IGNORE, np.int64),
           "segment": np.zeros(max_length, np.int64), "context": np.zeros(max_length, bool),
           "span": np.zeros(max_length, np.int64), "task": np.full(max_length, -1, np.int64)}
    pos = 0
    for span, rec in enumerate(records):
        n = len(rec["input"])
        for key in ("input", "target", "segment", "context", "task"):
            row[key][pos : pos + n] = rec[key]
        row["span"][pos : pos + n] = span
        pos += n
    row["span"][pos:] = len(records)  # padding: its own span, sees nothing real
    return row


def write_synthetic_packed(out: str | Path, vocab_size: int, num_rows: int, max_length: int = 256, seed: int = 0,
                           words: int | None = None, piece_length: tuple[int, int] = (32, 120),
                           chain_seed: int = 0) -> Path:
    """A packed dataset of `num_rows` rows of Markov-chain records (half lm, half mlm)."""
    rng = np.random.default_rng([seed, 2])
    limit = max_length - PROMPT_LENGTH - 2
    lo, hi = min(piece_length[0], limit), min(piece_length[1], limit)
    docs = markov_documents(vocab_size, num_docs=max(4, num_rows), doc_length=max_length * 2, seed=seed, words=words,
                            chain_seed=chain_seed)
    records, rows = [], []
    while len(rows) < num_rows:
        for doc in docs:
            at = 0
            while at < len(doc) - lo:
                size = int(rng.integers(lo, hi + 1))
                piece = doc[at : at + size]
                at += size
                task = TASK_LM if rng.random() < 0.5 else TASK_MLM
                records.append(make_record(piece, task, vocab_size, rng))
        rows = pack_rows(records, max_length)
        docs = markov_documents(vocab_size, len(docs), max_length * 2, seed=int(rng.integers(2**31)), words=words,
                                chain_seed=chain_seed)
    writer = PackedWriter(out, max_length, vocab_size, source="synthetic-markov", seed=seed)
    for row in rows[:num_rows]:
        writer.add_row(**row)
    return writer.close()


def unigram_entropy(path: str | Path) -> float:
    """Entropy (nats) of the target-token distribution of a packed dataset: the loss of a model that ignores
    context. A trained model must go well below it."""
    from cpmctl.data.packed import PackedDataset

    targets = PackedDataset(path).arrays["target"].reshape(-1)
    targets = targets[targets != IGNORE]
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if len(p) else math.nan
