"""Activation-based importance (Minitron, Muralidharan et al. 2024): score each prunable structure by how large its
activations are on a calibration set of training rows, with the model as it is (no gates).

Per structure type, over the predicted-or-context tokens of the calibration rows (padding excluded):
- attention / ffn sub-block: mean L2 norm of the sub-block's output, i.e. of what it adds to the residual stream;
- head: mean L2 norm of the head's output (its dim_head slice of the input of attention_out), summed over the
  layers, because the head mask is shared by every layer (gates.py);
- channel: mean |activation| of the FFN's intermediate channel (the input of w_out: gelu(w_0 x) * w_1 x).

Loss-based importance, computed with the model's gates (no weights change):
- `importance.layers: loss` (drop-one): a sub-block scores the increase of the calibration LM loss when it alone
  is removed (gate 0, everything else kept): one forward over the calibration batches per sub-block. The mean
  output norm says how much a sub-block writes into the residual stream, not how much the model needs it.
- `importance.heads: loss` (greedy search): the kept heads are chosen by the calibration loss of the model with
  only those heads, removing (or, when fewer than half are kept, adding) one head index at a time.

The scores have the shapes of the stage's gates (StageMasks), so they feed the same top-k selection
(`baselines.activation_selection`) and can initialise log_alpha (`StageMasks.init_from_scores`).
"""

from __future__ import annotations

import contextlib

import torch

from cpmctl.data.packed_format import PackedReader
from cpmctl.model.ant import CPMAnt
from cpmctl.prune.gates import clear_gates
from cpmctl.train.objectives import token_losses


def calibration_batches(rows, batch_size: int, batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`batches` batches of training rows drawn in a seeded shuffled order (the same rows for the same seed)."""
    reader = PackedReader(rows, min(batch_size, len(rows)), seed=seed)
    return [reader.next_batch() for _ in range(max(1, batches))]


@torch.no_grad()
def activation_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean activation norms per structure type (see the module docstring), keyed by the kinds asked for."""
    config = model.config
    h, dh = config.num_heads, config.dim_head
    attn_layers = [i for i in range(config.num_layers) if config.has_attention(i)]
    ffn_layers = [i for i in range(config.num_layers) if config.has_ffn(i)]
    blocks = model.encoder.layers
    sums = {"attention": torch.zeros(len(attn_layers), dtype=torch.float64),
            "ffn": torch.zeros(len(ffn_layers), dtype=torch.float64),
            "heads": torch.zeros(len(attn_layers), h, dtype=torch.float64),
            "channels": torch.zeros(len(ffn_layers), config.dim_ff, dtype=torch.float64)}
    state = {"tokens": None}  # the current batch's (B, L) mask of real tokens

    def masked_sum(values: torch.Tensor) -> torch.Tensor:  # (B, L, ...) -> (...) summed over real tokens
        return values[state["tokens"]].double().sum(dim=0).cpu()

    def add(kind: str, j: int, fn):
        def hook(module, args, output=None):
            sums[kind][j] += fn(args[0] if output is None else output)
        return hook

    handles = []
    for j, i in enumerate(attn_layers):
        att = blocks[i].self_att
        handles.append(att.register_forward_hook(add("attention", j, lambda o: masked_sum(o.float().norm(dim=-1)))))
        handles.append(att.self_attention.attention_out.register_forward_pre_hook(add(
            "heads", j, lambda x: masked_sum(x.float().unflatten(-1, (h, dh)).norm(dim=-1)))))
    for j, i in enumerate(ffn_layers):
        ffn = blocks[i].ffn
        handles.append(ffn.register_forward_hook(add("ffn", j, lambda o: masked_sum(o.float().norm(dim=-1)))))
        handles.append(ffn.ffn.w_out.register_forward_pre_hook(add("channels", j, lambda x: masked_sum(x.float().abs()))))
    device = model.input_embedding.weight.device
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            state["tokens"] = (batch["task"] >= 0).to(device)  # padding has task -1
            tokens += int(state["tokens"].sum())
            model(*(batch[k].to(device) for k in ("input", "segment", "context", "span")))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    means = {k: (v / max(tokens, 1)).float() for k, v in sums.items()}
    means["heads"] = means["heads"].sum(dim=0)  # one head mask for all layers
    return {k: means[k] for k in kinds}


def importance_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]],
                      targets: dict[str, int], layers: str = "norm", heads: str = "norm") -> dict[str, torch.Tensor]:
    """The activation importance of `kinds`; with layers="loss" the sub-blocks scored by their drop-one loss
    increase, with heads="loss" the heads by the greedy loss search (`greedy_head_scores`, needs the target)."""
    scores = activation_scores(model, kinds, batches)
    sub_blocks = [k for k in kinds if k in ("attention", "ffn")]
    if layers == "loss" and sub_blocks:
        scores.update(drop_one_scores(model, sub_blocks, batches))
    if heads == "loss" and "heads" in kinds:
        scores["heads"] = greedy_head_scores(model, batches, targets["heads"])
    return scores


def calibration_loss(model: CPMAnt, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted LM loss of the model, with whatever gates are set, over the calibration batches."""
    device = model.input_embedding.weight.device
    total, count = 0.0, 0
    for batch in batches:
        losses, _ = token_losses(model, {k: v.to(device) for k, v in batch.items()})  # no copy when already there
        total += float(losses.double().sum())
        count += losses.numel()
    return total / max(count, 1)


@torch.no_grad()
def drop_one_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per attention / FFN sub-block: calibration loss with that sub-block alone removed (gate 0) minus the loss of
    the whole model. Larger = more needed; negative = the model is better without it."""
    config = model.config
    blocks = model.encoder.layers
    device = model.input_embedding.weight.device
    scores = {}
    with _scoring(model, batches) as batches:
        base = calibration_loss(model, batches)
        for kind in kinds:
            row = []
            if kind in ("attention", "ffn"):
                has = config.has_attention if kind == "attention" else config.has_ffn
                for i in range(config.num_layers):
                    if has(i):
                        setattr(blocks[i], f"{kind}_gate", torch.zeros((), device=device))
                        row.append(calibration_loss(model, batches) - base)
                        setattr(blocks[i], f"{kind}_gate", None)
            else:
                raise ValueError(f"drop-one importance is not defined for {kind}")
            scores[kind] = torch.tensor(row, dtype=torch.float32)
    return scores


@contextlib.contextmanager
def _scoring(model: CPMAnt, batches: list[dict[str, torch.Tensor]]):
    """The model in eval mode without gates, and the batches moved to its device once; mode and gates restored."""
    device = model.input_embedding.weight.device
    was_training = model.training
    model.eval()
    clear_gates(model)
    try:
        yield [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    finally:
        clear_gates(model)
        model.train(was_training)


@torch.no_grad()
def loss_with_heads(model: CPMAnt, batches: list[dict[str, torch.Tensor]], keep: list[int]) -> float:
    """Calibration loss with only the heads `keep` (the same indices in every layer: the head mask is shared)."""
    device = model.input_embedding.weight.device
    gate = torch.zeros(model.config.num_heads, device=device)
    gate[keep] = 1
    for block in model.encoder.layers:
        if block.self_att is not None:
            block.self_att.self_attention.head_gate = gate
    try:
        return calibration_loss(model, batches)
    finally:
        clear_gates(model)


@torch.no_grad()
def greedy_head_scores(model: CPMAnt, batches: list[dict[str, torch.Tensor]], k: int) -> torch.Tensor:
    """Heads chosen by the calibration loss of the pruned model itself, one at a time: keeping k of h heads,
    from all heads remove, h - k times, the one whose removal leaves the lowest loss (k >= h / 2); or from none
    add, k times, the one whose addition gives the lowest loss (k < h / 2). Drop-one scores alone would keep the
    heads that matter most next to all the others, not the ones that do best on their own (4 -> 1 heads).
    min(k, h - k) rounds of at most h forwards. Scores: the k chosen heads above the others (top-k = the search)."""
    h = model.config.num_heads
    scores = torch.zeros(h)
    with _scoring(model, batches) as batches:
        if 2 * k >= h:  # backward: removed first = lowest score
            kept = list(range(h))
            for step in range(h - k):
                losses = {j: loss_with_heads(model, batches, [i for i in kept if i != j]) for j in kept}
                drop = min(kept, key=lambda j: (losses[j], j))
                scores[drop] = step - h
                kept.remove(drop)
            scores[kept] = 1.0
        else:  # forward: added first = highest score
            kept = []
            for step in range(k):
                rest = [j for j in range(h) if j not in kept]
                losses = {j: loss_with_heads(model, batches, kept + [j]) for j in rest}
                add = min(rest, key=lambda j: (losses[j], j))
                scores[add] = h - step
                kept.append(add)
            scores[[j for j in range(h) if j not in kept]] = -1.0
    return scores
