"""Activation-based importance (Minitron, Muralidharan et al. 2024): score each prunable structure by how large its
activations are on a calibration set of training rows, with the model as it is (no gates).

Per structure type, over the predicted-or-context tokens of the calibration rows (padding excluded):
- attention / ffn sub-block: mean L2 norm of the sub-block's output, i.e. of what it adds to the residual stream;
- head: mean L2 norm of the head's output (its dim_head slice of the input of attention_out), summed over the
  layers, because the head mask is shared by every layer (gates.py);
- channel: mean |activation| of the FFN's intermediate channel (the input of w_out: gelu(w_0 x) * w_1 x).

The scores have the shapes of the stage's gates (StageMasks), so they feed the same top-k selection
(`baselines.activation_selection`) and can initialise log_alpha (`StageMasks.init_from_scores`).
"""

from __future__ import annotations

import torch

from cpmctl.data.packed_format import PackedReader
from cpmctl.model.ant import CPMAnt


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
