"""The CPM-Ant input layout, in one place (shared/reference/cpm-ant.md sections 4-7).

Every sequence the model sees is the 32 prompt slots of a task (unified ids `vocab_size + 32 * task + j`,
segment 0, given) followed by text (segment 2 for lm-style text, 1 for mlm text). `context` True marks given
tokens (seen bidirectionally), False the tokens to predict (causal). A training record's target at position i is
the token at i + 1 when that token is to be predicted, else IGNORE. Records share a row in distinct spans; the
padding after them has a span of its own, so nothing attends to it.

Three builders sit on this layout: `make_record` (one training record), `pack_row` (records into one fixed-length
row: the only row builder; data packing, task tuning, perplexity scoring and the synthetic test data all use it)
and `build_inputs` (a left-padded batch of generation inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpmctl.model.tokenizer import PAD

PROMPT_LENGTH = 32  # prompt slots per task, as CPMAntConfig.prompt_length defaults to
MLM_TASK, LM_TASK = 1, 2  # prompt task ids of the two pretraining objectives; also the rows' `task` field
PROMPT_SEGMENT, MLM_SEGMENT, TEXT_SEGMENT = 0, 1, 2
IGNORE = -100  # target of a position with no loss

# The fields of a packed row and their on-disk dtypes (cpmctl/data/packed_format.py stores them as they are).
FIELDS = {
    "input": np.int32,
    "target": np.int32,
    "segment": np.uint8,
    "context": np.uint8,
    "span": np.int16,
    "task": np.int8,
}
TASK_NAMES = {MLM_TASK: "mlm", LM_TASK: "lm"}


def prompt_slots(vocab_size: int, task: int, prompt_length: int = PROMPT_LENGTH) -> list[int]:
    """Unified ids of the prompt slots of `task`."""
    return [vocab_size + prompt_length * task + j for j in range(prompt_length)]


@dataclass
class Record:
    """One training record: prompt slots + text, with its targets; `task` is the objective (the row field)."""

    input: np.ndarray
    target: np.ndarray
    segment: np.ndarray
    context: np.ndarray
    task: int

    def __len__(self) -> int:
        return len(self.input)


def make_record(text: Sequence[int], predicted: Sequence[bool] | np.ndarray, vocab_size: int, prompt_task: int,
                segment: int = TEXT_SEGMENT, task: int | None = None,
                prompt_length: int = PROMPT_LENGTH) -> Record:
    """A record of `text` token ids where `predicted[i]` marks text token i as one to predict (context False).
    `task` (the objective written in the row) defaults to `prompt_task`."""
    ids = np.asarray(prompt_slots(vocab_size, prompt_task, prompt_length) + list(text), dtype=FIELDS["input"])
    context = np.ones(len(ids), dtype=FIELDS["context"])
    context[prompt_length:][np.asarray(predicted, dtype=bool)] = 0
    target = np.full(len(ids), IGNORE, dtype=FIELDS["target"])
    to_predict = context[1:] == 0
    target[:-1][to_predict] = ids[1:][to_predict]
    seg = np.full(len(ids), segment, dtype=FIELDS["segment"])
    seg[:prompt_length] = PROMPT_SEGMENT
    return Record(ids, target, seg, context, prompt_task if task is None else task)


def given_then_predicted(given: Sequence[int], predicted: Sequence[int], vocab_size: int, prompt_task: int,
                         prompt_length: int = PROMPT_LENGTH) -> Record:
    """An lm-style record: `given` tokens (context True) then `predicted` tokens (context False)."""
    mask = [False] * len(given) + [True] * len(predicted)
    return make_record(list(given) + list(predicted), mask, vocab_size, prompt_task, TEXT_SEGMENT, LM_TASK,
                       prompt_length)


def pack_row(records: Sequence[Record], max_length: int, quirk_vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """One row: the records back to back, span k for record k, then padding (id 0, context False, target IGNORE,
    task -1, segment 0) in span len(records).

    quirk_vocab_size (the vocabulary size) reproduces a quirk of the original: its model sends only the first 32
    positions of a row through the prompt embedding, so the prompt ids (32 * task + j) of every later record of a
    packed row are read as ordinary vocabulary ids (tokens 32..95) from the input embedding. None (the default)
    gives every record its own prompt slots."""
    row = {
        "input": np.zeros(max_length, FIELDS["input"]),
        "target": np.full(max_length, IGNORE, FIELDS["target"]),
        "segment": np.zeros(max_length, FIELDS["segment"]),
        "context": np.zeros(max_length, FIELDS["context"]),
        "span": np.full(max_length, len(records), FIELDS["span"]),
        "task": np.full(max_length, -1, FIELDS["task"]),
    }
    pos = 0
    for k, r in enumerate(records):
        end = pos + len(r)
        if end > max_length:
            raise ValueError(f"records of {end} tokens do not fit a row of {max_length}")
        row["input"][pos:end] = r.input
        if k > 0 and quirk_vocab_size is not None:
            slots = row["input"][pos:end] >= quirk_vocab_size
            row["input"][pos:end][slots] -= quirk_vocab_size
        row["target"][pos:end] = r.target
        row["segment"][pos:end] = r.segment
        row["context"][pos:end] = r.context
        row["span"][pos:end] = k
        row["task"][pos:end] = r.task
        pos = end
    return row


def pack_in_order(records: Sequence[Record], max_length: int, share_rows: bool = True) -> list[dict[str, np.ndarray]]:
    """Rows of consecutive records (a new row when the next does not fit), or one record per row."""
    rows, current, used = [], [], 0
    for record in records:
        n = len(record)
        if n > max_length:
            raise ValueError(f"a record of {n} tokens does not fit a row of {max_length}")
        if current and (not share_rows or used + n > max_length):
            rows.append(pack_row(current, max_length))
            current, used = [], 0
        current.append(record)
        used += n
    if current:
        rows.append(pack_row(current, max_length))
    return rows


def build_inputs(model, token_lists: list[list[int]], task_id: int = LM_TASK, device=None) -> dict:
    """A batch of generation inputs: prompt slots, then each token list left-padded (pads in span 1, unseen),
    segment 2 for the text, context all True."""
    config = model.config
    device = device or model.input_embedding.weight.device
    p = config.prompt_length
    prompt = prompt_slots(config.vocab_size, task_id, p)
    width = max(len(t) for t in token_lists)
    rows, segs, spans = [], [], []
    for tokens in token_lists:
        pad = width - len(tokens)
        rows.append(prompt + [PAD] * pad + list(tokens))
        segs.append([PROMPT_SEGMENT] * (p + pad) + [TEXT_SEGMENT] * len(tokens))
        spans.append([0] * p + [1] * pad + [0] * len(tokens))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    ids = t(rows)
    return {"input": ids, "segment": t(segs), "span": t(spans), "context": torch.ones_like(ids, dtype=torch.bool)}
