"""Activation-based importance (Minitron, Muralidharan et al. 2024): score each prunable structure by how large its
activations are on a calibration set of training rows, with the model as it is (no gates).

Per structure type, over the predicted-or-context tokens of the calibration rows (padding excluded):
- attention / ffn sub-block: mean L2 norm of the sub-block's output, i.e. of what it adds to the residual stream;
- head: mean L2 norm of the head's output (its dim_head slice of the input of attention_out), summed over the
  layers, because the head mask is shared by every layer (gates.py);
- channel: mean |activation| of the FFN's intermediate channel (the input of w_out: gelu(w_0 x) * w_1 x);
  `importance.channels: output` multiplies it by the norm of the channel's column of w_out, making it the mean
  norm of what the channel writes (mean |h_j| * ||w_out[:, j]||, the channel's share of the sub-block's output, as
  the sub-block score is the norm of the sub-block's output; Wanda's |activation| x |weight|, per channel).

Loss-based importance, computed with the model's gates (no weights change):
- `importance.layers: loss` (drop-one): a sub-block scores the increase of the calibration LM loss when it alone
  is removed (gate 0, everything else kept): one forward over the calibration batches per sub-block. The mean
  output norm says how much a sub-block writes into the residual stream, not how much the model needs it.
  `importance.layer_search: greedy` removes them one at a time instead, each round the sub-block whose removal,
  with the ones removed before it, leaves the lowest loss (drop-one ranks each next to all the others kept).
- `importance.heads: loss` (greedy search): the kept heads are chosen by the calibration loss of the model with
  only those heads, removing (or, when fewer than half are kept, adding) one head index at a time; at a stage that
  also cuts dim_ff (`importance.width_search: joint`, the default), with that cut in place, so every candidate is
  the model the extraction would make (`separate`: with the whole FFN, which chose worse heads in bench/prune.py).
- `importance.layers / heads: kl`: the same two searches, each candidate scored by the mean KL(p_full || p_candidate)
  of the next-token distributions (temperature 1) over the target positions instead of the loss change: the
  expected loss change under the full model's own predictions, without the sampled labels' noise, and the teacher
  recovery distils toward. Batches outer, candidates inner: one batch's full-model log-probs held at a time.

The scores have the shapes of the stage's gates (StageMasks), so they feed the same top-k selection
(`baselines.activation_selection`) and can initialise log_alpha (`StageMasks.init_from_scores`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from cpmctl.data.packed_format import PackedReader
from cpmctl.model.ant import CPMAnt
from cpmctl.model.inputs import IGNORE
from cpmctl.prune.gates import clear_gates, top_k_mask
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


def channel_output_scale(model: CPMAnt) -> torch.Tensor:
    """(FFN layers, dim_ff): the L2 norm of each channel's column of w_out (folded weights: a constant factor
    per matrix, which leaves the per-layer ranking as the original weights give it)."""
    config = model.config
    return torch.stack([model.encoder.layers[i].ffn.ffn.w_out.weight.detach().float().norm(dim=0).cpu()
                        for i in range(config.num_layers) if config.has_ffn(i)])


def importance_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]],
                      targets: dict[str, int], layers: str = "norm", heads: str = "norm",  # named as ImportanceConfig
                      channels: str = "activation", layer_search: str = "drop-one",
                      width_search: str = "joint") -> dict[str, torch.Tensor]:
    """The activation importance of `kinds`; with layers="loss" / "kl" the sub-blocks scored by their drop-one
    loss increase / KL (layer_search="greedy": by the greedy removal, `greedy_sub_block_scores`), with heads="loss"
    / "kl" the heads by the greedy search (`greedy_head_scores`, needs the target), with channels="output" the
    channels by the mean norm of their output. width_search="joint" (heads by loss / kl and channels in one
    stage): the head search runs on the model with the stage's channel cut in place, so each candidate head set is
    judged as the extracted model will have it (the channels keep their scores from the whole model)."""
    scores = activation_scores(model, kinds, batches)
    if channels == "output" and "channels" in kinds:
        scores["channels"] = scores["channels"] * channel_output_scale(model)
    sub_blocks = [k for k in kinds if k in ("attention", "ffn")]
    if layers in ("loss", "kl") and sub_blocks:
        if layer_search == "greedy":
            scores.update(greedy_sub_block_scores(model, sub_blocks, batches, targets, layers))
        else:
            scores.update(drop_one_scores(model, sub_blocks, batches, layers))
    if heads in ("loss", "kl") and "heads" in kinds:
        joint = width_search == "joint" and "channels" in kinds
        cut = _channel_cut(model, top_k_mask(scores["channels"], targets["channels"])) if joint else None
        scores["heads"] = greedy_head_scores(model, batches, targets["heads"], heads, context=cut)
    return scores


def _channel_cut(model: CPMAnt, keep: torch.Tensor):
    """Sets each FFN layer's channel gate to `keep`'s row (FFN layers, dim_ff): the stage's channel cut."""
    layers = _sub_block_layers(model.config, ["ffn"])["ffn"]
    device = model.input_embedding.weight.device

    def set_gates():
        for row, i in zip(keep, layers):
            model.encoder.layers[i].ffn.ffn.channel_gate = row.float().to(device)
    return set_gates


def _target_log_probs(model: CPMAnt, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(targets, vocab) fp32 next-token log-probs at the target positions, the output head run only there."""
    hidden = model(batch["input"], batch["segment"], batch["context"], batch["span"], return_hidden=True)
    return torch.log_softmax(model.logits(hidden[batch["target"] != IGNORE]).float(), dim=-1)


@torch.no_grad()
def candidate_values(model: CPMAnt, batches: list[dict[str, torch.Tensor]], candidates: list,
                     score: str) -> list[float]:
    """Per candidate (a function that sets the model's gates; they are cleared after it), token-weighted over the
    target positions of the batches: the LM loss (score "loss") or KL(p_full || p_candidate) of the next-token
    distributions, p_full the model without gates ("kl"). Batches outer, candidates inner: one batch's full-model
    log-probs are held at a time (a forward per batch more than the candidates', none for "loss")."""
    totals, count = [0.0] * len(candidates), 0
    for batch in batches:
        full = _target_log_probs(model, batch) if score == "kl" else None
        for c, set_gates in enumerate(candidates):
            set_gates()
            try:
                if full is None:
                    totals[c] += float(token_losses(model, batch)[0].double().sum())
                else:
                    totals[c] += float(F.kl_div(_target_log_probs(model, batch), full, reduction="sum",
                                                log_target=True).double())
            finally:
                clear_gates(model)
        count += int((batch["target"] != IGNORE).sum())
    return [t / max(count, 1) for t in totals]


@torch.no_grad()
def drop_one_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]],
                    score: str = "loss") -> dict[str, torch.Tensor]:
    """Per attention / FFN sub-block, with that sub-block alone removed (gate 0): the calibration loss minus the
    loss of the whole model (score "loss"), or the KL from the whole model's predictions ("kl"). Larger = more
    needed; a negative loss score = the model is better without it."""
    config = model.config
    blocks = model.encoder.layers
    device = model.input_embedding.weight.device
    for kind in kinds:
        if kind not in ("attention", "ffn"):
            raise ValueError(f"drop-one importance is not defined for {kind}")

    def drop(i: int, kind: str):
        return lambda: setattr(blocks[i], f"{kind}_gate", torch.zeros((), device=device))

    layers = _sub_block_layers(config, kinds)
    candidates = [drop(i, k) for k in kinds for i in layers[k]]
    with _scoring(model, batches) as batches:
        values = candidate_values(model, batches, candidates + ([lambda: None] if score == "loss" else []), score)
    if score == "loss":
        values = [v - values[-1] for v in values[:-1]]  # minus the whole model's loss
    scores, at = {}, 0
    for kind in kinds:
        scores[kind] = torch.tensor(values[at:at + len(layers[kind])], dtype=torch.float32)
        at += len(layers[kind])
    return scores


def _sub_block_layers(config, kinds: list[str]) -> dict[str, list[int]]:
    """Per sub-block kind, the layers that have one."""
    has = {"attention": config.has_attention, "ffn": config.has_ffn}
    return {k: [i for i in range(config.num_layers) if has[k](i)] for k in kinds}


@torch.no_grad()
def greedy_sub_block_scores(model: CPMAnt, kinds: list[str], batches: list[dict[str, torch.Tensor]],
                            targets: dict[str, int], score: str = "loss") -> dict[str, torch.Tensor]:
    """Sub-blocks removed one at a time down to the target counts: each round, of the kinds still above their
    target, the sub-block whose removal (with the ones removed in earlier rounds) leaves the lowest calibration
    loss (score "loss") or KL from the whole model ("kl"). Removing r of n sub-blocks costs r rounds of at most n
    forwards over the batches, against n for drop-one. Scores: the removal order (removed first = lowest), the
    kept sub-blocks above every removed one, so the top-k per kind is the search's result."""
    blocks = model.encoder.layers
    device = model.input_embedding.weight.device
    layers = _sub_block_layers(model.config, kinds)
    to_remove = {k: len(layers[k]) - min(targets[k], len(layers[k])) for k in kinds}
    removed: list[tuple[str, int]] = []
    scores = {k: torch.ones(len(layers[k])) for k in kinds}

    def without(extra: tuple[str, int]):
        def set_gates():
            for kind, i in removed + [extra]:
                setattr(blocks[i], f"{kind}_gate", torch.zeros((), device=device))
        return set_gates

    total = sum(to_remove.values())
    with _scoring(model, batches) as batches:
        for step in range(total):
            tried = [(k, i) for k in kinds if sum(r[0] == k for r in removed) < to_remove[k]
                     for i in layers[k] if (k, i) not in removed]
            values = candidate_values(model, batches, [without(c) for c in tried], score)
            kind, i = tried[min(range(len(tried)), key=lambda c: (values[c], c))]
            scores[kind][layers[kind].index(i)] = step - total
            removed.append((kind, i))
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


def _keep_heads(model: CPMAnt, keep: list[int], context=None):
    """A candidate of the head search: only the heads `keep` (the same in every layer: the head mask is shared),
    with the gates `context` sets (the stage's channel cut) besides."""
    def set_gates():
        if context is not None:
            context()
        gate = torch.zeros(model.config.num_heads, device=model.input_embedding.weight.device)
        gate[keep] = 1
        for block in model.encoder.layers:
            if block.self_att is not None:
                block.self_att.self_attention.head_gate = gate
    return set_gates


@torch.no_grad()
def greedy_head_scores(model: CPMAnt, batches: list[dict[str, torch.Tensor]], k: int,
                       score: str = "loss", context=None) -> torch.Tensor:
    """Heads chosen by the calibration loss (score "loss") or the KL from the whole model ("kl") of the pruned
    model itself, one at a time: keeping k of h heads, from all heads remove, h - k times, the one whose removal
    leaves the lowest value (k >= h / 2); or from none add, k times, the one whose addition gives the lowest
    (k < h / 2). Drop-one scores alone would keep the heads that matter most next to all the others, not the ones
    that do best on their own (4 -> 1 heads). min(k, h - k) rounds of at most h forwards (one more per batch and
    round for "kl"). `context` sets other gates in every candidate (the stage's channel cut).
    Scores: the k chosen heads above the others (top-k = the search)."""
    h = model.config.num_heads
    scores = torch.zeros(h)

    def best(tried: list[int], keep) -> int:  # the tried head whose candidate head set scores lowest
        values = candidate_values(model, batches, [_keep_heads(model, keep(j), context) for j in tried], score)
        return min(zip(values, tried))[1]

    with _scoring(model, batches) as batches:
        if 2 * k >= h:  # backward: removed first = lowest score
            kept = list(range(h))
            for step in range(h - k):
                drop = best(kept, lambda j: [i for i in kept if i != j])
                scores[drop] = step - h
                kept.remove(drop)
            scores[kept] = 1.0
        else:  # forward: added first = highest score
            kept = []
            for step in range(k):
                add = best([j for j in range(h) if j not in kept], lambda j: kept + [j])
                scores[add] = h - step
                kept.append(add)
            scores[[j for j in range(h) if j not in kept]] = -1.0
    return scores
