"""Per-document negative log-likelihood with a CPM-Ant model: the scorer behind `data filter`'s perplexity rule
and `eval ppl`.

A document is fed as generation input is (shared/reference/cpm-ant.md sections 4-5): the 32 prompt slots of task
2, then [<s>] + its tokens, segment 0 for the prompt and 2 for the text. The prompt and <s> are given (context
True); the text tokens have context False, so each is predicted causally from everything before it. A document
longer than one window is cut into windows of max_length (each again prompt + <s> + its piece), and the NLL is
summed over all of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.model.tokenizer import BOS, PAD

TASK = 2
TEXT_SEGMENT = 2


class DocumentScore(NamedTuple):
    nll_sum: float
    tokens: int
    chars: int

    @property
    def perplexity(self) -> float:
        """Per-token perplexity; inf for a document with no scorable token."""
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("inf")


def _windows(doc: int, ids: list[int], capacity: int) -> list[tuple[int, list[int]]]:
    return [(doc, ids[i : i + capacity]) for i in range(0, len(ids), capacity)]


@torch.no_grad()
def score_documents(model, tokenizer, texts: list[str], max_length: int = 1024, batch_size: int = 8,
                    device=None) -> list[DocumentScore]:
    """(nll_sum, tokens, chars) per text, in nats; `tokens` = tokens scored (<unk> dropped, as model inputs)."""
    config = model.config
    p = config.prompt_length
    capacity = max_length - p - 1
    if capacity < 1:
        raise CpmctlError(f"max_length {max_length} leaves no room for text after {p} prompt slots and <s>")
    if tokenizer.vocab_size != config.vocab_size:
        raise CpmctlError(f"vocab has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}")
    device = device if device is not None else next(model.parameters()).device
    nll_sums, token_counts = [0.0] * len(texts), [0] * len(texts)
    windows = []
    for i, text in enumerate(texts):
        windows.extend(_windows(i, tokenizer.encode_for_model(text), capacity))
    # Longest first, so each batch pads little.
    windows.sort(key=lambda w: -len(w[1]))
    prompt = [config.vocab_size + p * TASK + j for j in range(p)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            width = p + 1 + max(len(ids) for _, ids in batch)
            rows, segs, ctx, spans = [], [], [], []
            for _, ids in batch:
                pad = width - p - 1 - len(ids)
                rows.append(prompt + [BOS] + ids + [PAD] * pad)
                segs.append([0] * p + [TEXT_SEGMENT] * (1 + len(ids)) + [0] * pad)
                ctx.append([True] * (p + 1) + [False] * len(ids) + [False] * pad)
                spans.append([0] * (p + 1 + len(ids)) + [1] * pad)  # padding in its own span: invisible
            t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
            hidden = model(t(rows), t(segs), t(ctx, torch.bool), t(spans), return_hidden=True)
            for row, (doc, ids) in enumerate(batch):
                # Position p + j (the <s> for j = 0) predicts text token j.
                h = hidden[row, p : p + len(ids)]
                logits = model.logits(h).float()
                nll = F.cross_entropy(logits, t(ids), reduction="sum")
                nll_sums[doc] += float(nll)
                token_counts[doc] += len(ids)
    finally:
        model.train(was_training)
    return [DocumentScore(n, k, len(t)) for n, k, t in zip(nll_sums, token_counts, texts)]
