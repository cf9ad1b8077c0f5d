"""Structure selections that need no mask training: the peers the learned masks are measured against (bench/prune.py)
and usable on their own (`method: random | magnitude | activation` in a prune recipe).

- random: uniformly random kept layers / heads / channels, with the target counts.
- magnitude: keep the structures whose weights have the largest norm. A sub-block is scored by the Frobenius norm
  of its output projection (what it writes into the residual stream), a head by the norm of its q, k, v rows and
  attention_out columns summed over all layers (the head mask is shared), a channel by
  |w_0 row| * |w_1 row| * |w_out column| (the gated unit's output scales with all three).
- activation: keep the structures with the largest mean activation norms on calibration rows (Minitron), or with
  the largest drop-one loss increase / by a greedy loss search (`importance.layers / heads: loss`; importance.py).
"""

from __future__ import annotations

import torch

from cpmctl.model.ant import CPMAnt
from cpmctl.prune.gates import Selection, top_k_mask
from cpmctl.prune.importance import importance_scores


def _layers(model: CPMAnt, kind: str) -> list[int]:
    config = model.config
    has = config.has_attention if kind == "attention" else config.has_ffn
    return [i for i in range(config.num_layers) if has(i)]


def _select(model: CPMAnt, targets: dict[str, int], scores: dict[str, torch.Tensor]) -> Selection:
    """Top-k of each score; kept structures carry gate value 1."""
    sel = Selection.keep_all(model.config)
    for kind, score in scores.items():
        keep = top_k_mask(score, targets[kind])
        if kind in ("attention", "ffn"):
            layers = _layers(model, kind)
            keep_attr, scale_attr = f"{kind}_keep", f"{kind}_scale"
            getattr(sel, keep_attr)[layers] = keep
            getattr(sel, scale_attr)[layers] = keep.float()
        elif kind == "heads":
            sel.head_keep = keep
            sel.head_scale = keep.float().expand_as(sel.head_scale).clone()
        else:
            layers = _layers(model, "ffn")
            sel.channel_keep[layers] = keep
            sel.channel_scale[layers] = keep.float()
    return sel


def random_selection(model: CPMAnt, kinds: list[str], targets: dict[str, int], seed: int = 0) -> Selection:
    g = torch.Generator().manual_seed(seed)
    config = model.config
    shapes = {"attention": (len(_layers(model, "attention")),), "ffn": (len(_layers(model, "ffn")),),
              "heads": (config.num_heads,), "channels": (len(_layers(model, "ffn")), config.dim_ff)}
    return _select(model, targets, {k: torch.rand(shapes[k], generator=g) for k in kinds})


@torch.no_grad()
def magnitude_scores(model: CPMAnt, kinds: list[str]) -> dict[str, torch.Tensor]:
    config = model.config
    h, dh, d = config.num_heads, config.dim_head, config.dim_model
    layers = model.encoder.layers
    scores = {}
    if "attention" in kinds:
        scores["attention"] = torch.stack([
            layers[i].self_att.self_attention.attention_out.weight.float().norm() for i in _layers(model, "attention")])
    if "ffn" in kinds:
        scores["ffn"] = torch.stack([layers[i].ffn.ffn.w_out.weight.float().norm() for i in _layers(model, "ffn")])
    if "heads" in kinds:
        total = torch.zeros(h)
        for i in _layers(model, "attention"):
            att = layers[i].self_att.self_attention
            sq = sum(getattr(att, n).weight.float().view(h, dh, d).pow(2).sum(dim=(1, 2))
                     for n in ("project_q", "project_k", "project_v"))
            sq = sq + att.attention_out.weight.float().view(d, h, dh).pow(2).sum(dim=(0, 2))
            total += sq.sqrt().cpu()
        scores["heads"] = total
    if "channels" in kinds:
        rows = []
        for i in _layers(model, "ffn"):
            ffn = layers[i].ffn.ffn
            rows.append((ffn.w_in.w_0.weight.float().norm(dim=1) * ffn.w_in.w_1.weight.float().norm(dim=1)
                         * ffn.w_out.weight.float().norm(dim=0)).cpu())
        scores["channels"] = torch.stack(rows)
    return {k: v.cpu() for k, v in scores.items()}


def magnitude_selection(model: CPMAnt, kinds: list[str], targets: dict[str, int]) -> Selection:
    return _select(model, targets, magnitude_scores(model, kinds))


def activation_selection(model: CPMAnt, kinds: list[str], targets: dict[str, int],
                         batches: list[dict[str, torch.Tensor]], **options: str) -> Selection:
    """Top-k of `importance_scores`; `options` are its scoring choices (a recipe's importance section)."""
    return _select(model, targets, importance_scores(model, kinds, batches, targets, **options))
