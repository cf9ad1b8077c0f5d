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

import numpy as np
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.model.inputs import LM_TASK, given_then_predicted, pack_row
from cpmctl.model.tokenizer import BOS


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
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            width = p + 1 + max(len(ids) for _, ids in batch)
            records = [given_then_predicted([BOS], ids, config.vocab_size, LM_TASK, p) for _, ids in batch]
            rows = [pack_row([r], width) for r in records]
            t = lambda key, dt=torch.long: torch.tensor(np.stack([r[key] for r in rows]), dtype=dt, device=device)  # noqa: E731
            hidden = model(t("input"), t("segment"), t("context", torch.bool), t("span"), return_hidden=True)
            for row, (doc, ids) in enumerate(batch):
                # Position p + j (the <s> for j = 0) predicts text token j.
                h = hidden[row, p : p + len(ids)]
                logits = model.logits(h).float()
                nll = F.cross_entropy(logits, torch.tensor(ids, device=device), reduction="sum")
                nll_sums[doc] += float(nll)
                token_counts[doc] += len(ids)
    finally:
        model.train(was_training)
    return [DocumentScore(n, k, len(t)) for n, k, t in zip(nll_sums, token_counts, texts)]
