"""Training objectives on packed batches.

A packed row already holds both CPM-Ant objectives (shared/reference/cpm-ant.md section 7): an lm record predicts a
causal suffix, an mlm record predicts scattered positions seen with bidirectional context. Both reduce to the same
thing here: cross-entropy on every position whose target is not -100; the `task` field only labels the positions,
so the loss of each objective can be logged apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpmctl.model.inputs import IGNORE, TASK_NAMES
from cpmctl.train.engine import unwrap


def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy (fp32) over the target positions, and the mask of those positions."""
    target = batch["target"]
    mask = target != IGNORE
    head = getattr(unwrap(model), "logits", None)
    if head is None:  # a model without a separate output head: full logits, then the target rows
        logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])[mask]
    else:
        # The output head (a vocab-sized matmul) runs only where there is a loss: prompt slots, given tokens and
        # padding need no logits. The loss and its gradients are the same as from full logits.
        hidden = model(batch["input"], batch["segment"], batch["context"], batch["span"], return_hidden=True)
        logits = head(hidden[mask])
    losses = F.cross_entropy(logits.float(), target[mask], reduction="none")
    return losses, mask


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the target positions; the mean per objective (loss/lm, loss/mlm) in the metrics."""
    losses, mask = token_losses(model, batch)
    count = losses.numel()
    # A batch without targets contributes zero loss (and zero gradient) instead of NaN.
    loss = losses.sum() / max(count, 1)
    metrics = {"targets": float(count)}
    tasks = batch["task"][mask]
    with torch.no_grad():
        for task_id, name in TASK_NAMES.items():
            selected = tasks == task_id
            n = int(selected.sum())
            if n:
                metrics[f"loss/{name}"] = float(losses[selected].sum()) / n
                metrics[f"targets/{name}"] = float(n)
    return loss, metrics
