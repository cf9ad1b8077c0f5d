"""Synthetic packed data with learnable structure, for tests and benchmarks (bench/prune.py) without a corpus.

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

from cpmctl.data.packed_format import PackedWriter
from cpmctl.model import inputs
from cpmctl.model.inputs import IGNORE, LM_TASK, MLM_SEGMENT, MLM_TASK, PROMPT_LENGTH, TEXT_SEGMENT, Record, pack_in_order
from cpmctl.model.tokenizer import BOS, EOS

FIRST_WORD = 10  # the first non-special token id in every CPM-Ant vocab


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


def make_record(piece: np.ndarray, task: int, vocab_size: int, rng: np.random.Generator) -> Record:
    """One training instance: prompt slots, [<s>] + piece + [</s>], an lm suffix or mlm positions to predict."""
    text = [BOS, *piece.tolist(), EOS]
    predicted = np.zeros(len(text), dtype=bool)
    if task == LM_TASK:
        predicted[1 + int(rng.integers(0, len(text) - 1)) :] = True  # predict a random-length suffix
    else:
        predicted = rng.random(len(text)) < rng.uniform(0.1, 0.5)
        predicted[0] = False  # <s> is always given
    return inputs.make_record(text, predicted, vocab_size, task, TEXT_SEGMENT if task == LM_TASK else MLM_SEGMENT)


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
                task = LM_TASK if rng.random() < 0.5 else MLM_TASK
                records.append(make_record(piece, task, vocab_size, rng))
        rows = pack_in_order(records, max_length)
        docs = markov_documents(vocab_size, len(docs), max_length * 2, seed=int(rng.integers(2**31)), words=words,
                                chain_seed=chain_seed)
    writer = PackedWriter(out, max_length, vocab_size, source="synthetic-markov", seed=seed)
    for row in rows[:num_rows]:
        writer.add_row(**row)
    return writer.close()


def unigram_entropy(path: str | Path) -> float:
    """Entropy (nats) of the target-token distribution of a packed dataset: the loss of a model that ignores
    context. A trained model must go well below it."""
    from cpmctl.data.packed_format import PackedDataset

    targets = PackedDataset(path).arrays["target"].reshape(-1)
    targets = targets[targets != IGNORE]
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if len(p) else math.nan
