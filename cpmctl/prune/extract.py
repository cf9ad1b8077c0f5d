"""Extraction: cut a model down to a Selection, computing exactly what the deterministic masked model computes.

In memory the weights are folded (the original's 1/sqrt(in) factors are already inside them), so slicing rows and
columns changes nothing else: a kept head or channel contributes the same output as before and a dropped one
contributed zero. On export, `checkpoint.unfold` multiplies back with the PRUNED dims, which is what the
original's loader expects; the original's extraction sliced unfolded weights and so scaled every pruned layer's
output by sqrt(old_in / new_in). The gate values of kept structures are multiplied into the output projections
(attention_out columns, w_out columns), so the extracted model needs no gates at all.

The position-bias table is shared by all layers and has one column per head index; the head selection is shared
too (gates.py), so slicing the columns by it is exact for every layer.
"""

from __future__ import annotations

import dataclasses

import torch

from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.config import CPMAntConfig
from cpmctl.prune.gates import Selection


def target_config(source: CPMAntConfig, selection: Selection) -> CPMAntConfig:
    channels = {int(selection.channel_keep[i].sum()) for i in range(source.num_layers) if selection.ffn_keep[i]}
    if len(channels) > 1:
        raise ValueError(f"channel selection keeps different counts per layer: {sorted(channels)}")
    dim_ff = channels.pop() if channels else source.dim_ff
    return dataclasses.replace(
        source, num_heads=int(selection.head_keep.sum()), dim_ff=dim_ff, mask_modules=selection.mask_modules
    )


@torch.no_grad()
def extracted_state(model: CPMAnt, selection: Selection) -> dict[str, torch.Tensor]:
    """The folded state dict of the pruned model."""
    config = model.config
    src = model.state_dict()
    device = src["input_embedding.weight"].device
    heads = torch.nonzero(selection.head_keep).flatten().to(device)
    h, dh, d = config.num_heads, config.dim_head, config.dim_model
    out = {
        "input_embedding.weight": src["input_embedding.weight"],
        "prompt_embedding.weight": src["prompt_embedding.weight"],
        "segment_embedding.weight": src["segment_embedding.weight"],
        "encoder.output_layernorm.weight": src["encoder.output_layernorm.weight"],
        "position_bias.relative_attention_bias": src["position_bias.relative_attention_bias"][:, heads],
    }
    for i in range(config.num_layers):
        p = f"encoder.layers.{i}."
        if selection.attention_keep[i]:
            a = p + "self_att.self_attention."
            out[p + "self_att.layernorm_before_attention.weight"] = src[p + "self_att.layernorm_before_attention.weight"]
            for name in ("project_q", "project_k", "project_v"):
                w = src[a + name + ".weight"].view(h, dh, d)
                out[a + name + ".weight"] = w[heads].reshape(-1, d)
            scale = (selection.head_scale[i] * selection.attention_scale[i]).to(device, torch.float32)
            w = src[a + "attention_out.weight"].view(d, h, dh).float() * scale.view(1, h, 1)
            out[a + "attention_out.weight"] = w[:, heads].reshape(d, -1).to(src[a + "attention_out.weight"].dtype)
        if selection.ffn_keep[i]:
            f = p + "ffn.ffn."
            channels = torch.nonzero(selection.channel_keep[i]).flatten().to(device)
            out[p + "ffn.layernorm_before_ffn.weight"] = src[p + "ffn.layernorm_before_ffn.weight"]
            out[f + "w_in.w_0.weight"] = src[f + "w_in.w_0.weight"][channels]
            out[f + "w_in.w_1.weight"] = src[f + "w_in.w_1.weight"][channels]
            w_out = src[f + "w_out.weight"]
            scale = (selection.channel_scale[i] * selection.ffn_scale[i]).to(device, torch.float32)
            out[f + "w_out.weight"] = (w_out.float() * scale.view(1, -1))[:, channels].to(w_out.dtype)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def extract(model: CPMAnt, selection: Selection) -> CPMAnt:
    """A new, smaller CPMAnt (same device and dtype) equal in function to `selection.apply(model)`."""
    config = target_config(model.config, selection)
    weight = model.input_embedding.weight
    pruned = build_model(config, device="meta", dtype=weight.dtype)
    pruned.load_state_dict(extracted_state(model, selection), assign=True)
    return pruned.to(weight.device).train(model.training)
