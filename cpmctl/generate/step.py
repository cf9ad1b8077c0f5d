"""One decode step with less per-step work than CPMAnt.forward: a generated token per row through the KV cache.

A batch-1 step of the ~109M bench model on one CPU core is about 40 ms of matrix-vector products and several ms of
per-op dispatch: a 12-layer model 64 wide (all dispatch, no arithmetic) took 6.0 ms a step through the forward and
takes 3.7 ms here (CPU time, 1 thread, both in one process: docs/generate.md). This step runs the same kernels on
the same operands in the same order as `model(tokens[:, None], segment, context, span, cache=cache)[:, -1]`, so its
logits are equal bit for bit (tests/test_generate.py), with fewer calls around them:

- activations stay (rows, dim_model): no 3-D matmul folding and unfolding around every linear;
- each module's `forward` is called directly (the model has no hooks: checked), a plain linear as the one mm that
  F.linear calls; the modules are looked up once per generation, not once per step;
- the residual adds and the gated GELU's product are in place (the same sums, no new tensors);
- a cached key/value row is written with one select + copy, the attention bias is cast once per step, not per layer,
  and the token embedding is a plain lookup (a generated id is always a vocabulary id, never a prompt slot).

Models this does not cover take CPMAnt.forward: training mode, any forward hook (a streamed model, offload.py),
pruning gates.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from cpmctl.model.ant import CPMAnt, KVCache


def _linear(module: nn.Module):
    """x (rows, in) -> module(x): a plain bias-free nn.Linear as the one mm F.linear itself ends in (on a 2-D input,
    F.linear(x, W) is mm(x, W.t())), anything else (int8, LoRA) through its own forward."""
    if type(module) is nn.Linear and module.bias is None:
        return functools.partial(torch.mm, mat2=module.weight.t())
    return module.forward


def _has_hooks(model: nn.Module) -> bool:
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def covers(model: CPMAnt) -> bool:
    """Whether DecodeStep computes exactly what CPMAnt.forward does for this model (else use the forward)."""
    if model.training or _has_hooks(model):
        return False
    for block in model.encoder.layers:
        if block.attention_gate is not None or block.ffn_gate is not None:
            return False
        if block.self_att is not None and block.self_att.self_attention.head_gate is not None:
            return False
        if block.ffn is not None and block.ffn.ffn.channel_gate is not None:
            return False
    return True


class DecodeStep:
    """Bound to one model for one generation: `step(cache, tokens, segment, context, span)` -> logits (rows, vocab)
    in the logits' dtype, as `model(tokens[:, None], ..., cache=cache)[:, -1]`; every input is (rows, 1) but
    `tokens` (rows,)."""

    def __init__(self, model: CPMAnt):
        self.model = model
        config = model.config
        self.heads, self.dim_head = config.num_heads, config.dim_head
        self.layers = []
        for i, block in enumerate(model.encoder.layers):
            attention = None
            if block.self_att is not None:
                att = block.self_att.self_attention
                attention = (block.self_att.layernorm_before_attention.forward, _linear(att.project_q),
                             _linear(att.project_k), _linear(att.project_v), _linear(att.attention_out))
            ffn = None
            if block.ffn is not None:
                inner = block.ffn.ffn
                ffn = (block.ffn.layernorm_before_ffn.forward, _linear(inner.w_in.w_0), _linear(inner.w_in.w_1),
                       _linear(inner.w_out))
            self.layers.append((i, attention, ffn))
        self.final_norm = model.encoder.output_layernorm.forward

    def __call__(self, cache: KVCache, tokens: torch.Tensor, segment, context, span) -> torch.Tensor:
        model, rows = self.model, tokens.shape[0]
        start = cache.length
        end = start + 1
        context = context.bool()
        cache.append_meta(segment, context, span)
        positions = torch.arange(end, device=tokens.device)[None].expand(rows, end)
        bias = model.attention_bias(segment, context, span, positions[:, start:], cache.segment[:, :end],
                                    cache.context[:, :end], cache.span[:, :end], positions)
        h = F.embedding(tokens, model.input_embedding.weight)
        h.add_(F.embedding(segment[:, 0], model.segment_embedding.weight))
        bias = bias.to(h.dtype)
        split = (rows, self.heads, self.dim_head)
        for i, attention, ffn in self.layers:
            if attention is not None:
                norm, project_q, project_k, project_v, attention_out = attention
                x = norm(h)
                q = project_q(x).view(rows, self.heads, 1, self.dim_head)
                keys, values = cache.k[i], cache.v[i]
                keys.select(2, start).copy_(project_k(x).view(split))
                values.select(2, start).copy_(project_v(x).view(split))
                out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=bias)
                h.add_(attention_out(out.view(rows, -1)))
            if ffn is not None:
                norm, w_0, w_1, w_out = ffn
                x = norm(h)
                hidden = F.gelu(w_0(x))
                h.add_(w_out(hidden.mul_(w_1(x))))
        cache.length = end
        return model.logits(self.final_norm(h))
