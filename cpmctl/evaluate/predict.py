"""Predictions of a model on a task's examples: decoded text for generation tasks, the chosen option for choice
tasks, a relevance score for ranking tasks. Choice and ranking read the logit of "是" after the filled template
(which ends in "[是否正确]"), as the original did; it is the logit their training rows train.

Batches group examples of similar length (less padding); results come back in the input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cpmctl.generate.decode import beam_search, greedy, sample
from cpmctl.model.checkpoint import check_vocab_size
from cpmctl.model.inputs import build_inputs
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.tasks.kinds import YES, ChoiceTask, GenerationTask, RankingTask, Task, single_token
from cpmctl.tasks.schema import Example

Progress = Callable[[int], None] | None
DECODERS = {"beam": beam_search, "greedy": greedy, "sample": sample}


def predict(task: Task, model, tokenizer: CPMAntTokenizer, examples: Sequence[Example], batch_size: int = 8,
            device=None, progress: Progress = None, **decode) -> list:
    """One prediction per example; `decode` overrides a generation task's decoding (None values are ignored)."""
    check_vocab_size(tokenizer, model.config.vocab_size)
    device = device or next(model.parameters()).device
    if isinstance(task, GenerationTask):
        return generate_texts(task, model, tokenizer, examples, batch_size, device, progress, decode)
    if isinstance(task, ChoiceTask):
        return [int(np.argmax(s)) for s in option_scores(task, model, tokenizer, examples, batch_size, device, progress)]
    if isinstance(task, RankingTask):
        lists = [task.pair_ids(ex, tokenizer, task.max_length) for ex in examples]
        return yes_logits(model, tokenizer, lists, task.prompt_task_id, batch_size, device, progress)
    raise TypeError(f"no predictor for task kind {task.kind!r}")


@torch.no_grad()
def generate_texts(task: GenerationTask, model, tokenizer, examples, batch_size, device, progress: Progress,
                   decode: dict) -> list[str]:
    cfg = task.decode.updated(decode)
    run = DECODERS[cfg.decode]
    given = [task.given_ids(ex.input, tokenizer, task.max_length) for ex in examples]
    order = sorted(range(len(given)), key=lambda i: len(given[i]))
    out: list[str | None] = [None] * len(given)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = build_inputs(model, [given[i] for i in idx], task_id=task.prompt_task_id, device=device)
        for i, ids in zip(idx, run(model, inputs, cfg)):
            out[i] = tokenizer.decode(ids)
        if progress is not None:
            progress(len(idx))
    return out


def option_scores(task: ChoiceTask, model, tokenizer, examples, batch_size: int = 8, device=None,
                  progress: Progress = None) -> list[list[float]]:
    """The "是" logit of every option of every example."""
    lists, owner = [], []
    for e, ex in enumerate(examples):
        for o in ex.options:
            lists.append(task.option_ids(ex, o, tokenizer, task.max_length))
            owner.append(e)
    device = device or next(model.parameters()).device
    flat = yes_logits(model, tokenizer, lists, task.prompt_task_id, batch_size, device, progress)
    scores: list[list[float]] = [[] for _ in examples]
    for e, s in zip(owner, flat):
        scores[e].append(s)
    return scores


@torch.no_grad()
def yes_logits(model, tokenizer, token_lists: list[list[int]], prompt_task_id: int, batch_size: int, device,
               progress: Progress = None) -> list[float]:
    """The logit of "是" after each given sequence, batched."""
    yes = single_token(tokenizer, YES)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    scores = [0.0] * len(token_lists)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = build_inputs(model, [token_lists[i] for i in idx], task_id=prompt_task_id, device=device)
        logits = model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"], last_only=True)
        for i, value in zip(idx, logits[:, -1, yes].float().tolist()):
            scores[i] = value
        if progress is not None:
            progress(len(idx))
    return scores
