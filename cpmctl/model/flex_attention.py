"""FlexAttention for CPM-Ant training (`train.attention: flex`): the same scores as CPMAnt.attention_bias + SDPA,
without a float (b, H, n, n) bias.

SDPA with a float mask runs CUDA's memory-efficient kernel and autograd keeps a (b, H, n, n) bias gradient in every
layer. Here the segment/position bias is a `score_mod` that reads the shared (segment_types**2 + num_buckets, H)
table (its gradient flows into the table), and the prefix-LM rules of `attention_allowed` are a `mask_mod` and the
`BlockMask` built from it, so the kernel skips whole blocks no query sees (other spans, the future of targets).
The score_mod computes each bucket from (b, n) row metadata and one (2n - 1,) distance -> bucket vector: no
(b, n, n) bucket tensor either. Training positions are 0..n-1 in every row (no KV cache), so the distance k - q is
kv_idx - q_idx.

Only training-style forwards (no cache) use it; decoding keeps SDPA. Which kernel runs (checked with torch 2.13):
- CUDA (any device but the CPU): torch.compile(flex_attention), the fused kernel; inside an already compiled model
  (`train.compile`) the plain call, which the outer graph compiles.
- CPU without gradients (validation): flex_attention itself, torch's unfused reference implementation.
- CPU with gradients: torch refuses FlexAttention's backward on the CPU ("FlexAttention does not support backward
  on CPU", eager and torch.compile alike), so the same score_mod and mask_mod are evaluated on the dense
  (b, H, n, n) grid and handed to SDPA. A correctness path for tests and CPU demos, not a fast one. The same under
  torch.compile on the CPU, whose flex lowering fails even for the forward (inductor: "NoValidChoicesError").

Dropout on the attention probabilities: flex has none, so a model with dropout_p > 0 is refused when training.
Rows with no visible key cannot occur (every token sees itself); if one did, both paths give 0 on the CPU.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl import CpmctlError

ATTENTION_KINDS = ("sdpa", "flex")  # train.attention
_compiled_flex = None  # torch.compile(flex_attention), built on first CUDA use


def _flex_api():
    try:
        from torch.nn.attention import flex_attention as api
    except ImportError as e:  # torch < 2.5
        raise CpmctlError(f"train.attention: flex needs torch >= 2.5 with torch.nn.attention.flex_attention "
                          f"(this torch is {torch.__version__}); use train.attention=sdpa") from e
    return api


def dropout_refusal(dropout_p: float) -> CpmctlError:
    return CpmctlError(f"train.attention: flex has no attention dropout and the model has dropout_p={dropout_p:g}; "
                       "use train.attention=sdpa (or a model with dropout_p 0)")


def use_attention(model: nn.Module, kind: str) -> None:
    """Select the attention of every CPM-Ant model inside `model` (a peft or pruning wrapper included) for its
    training-style forwards. Refuses flex where it would change the maths (attention dropout)."""
    if kind not in ATTENTION_KINDS:
        raise CpmctlError(f"train.attention: expected one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    # Duck-typed on the attribute: importing CPMAnt here would make ant.py and this module import each other.
    models = [m for m in model.modules() if hasattr(m, "attention_kernel")]
    if kind == "flex":
        if not models:
            raise CpmctlError("train.attention: flex needs a CPM-Ant model; this one has none")
        _flex_api()
        for m in models:
            if m.config.dropout_p > 0:
                raise dropout_refusal(m.config.dropout_p)
    for m in models:
        m.attention_kernel = kind


class FlexMask:
    """One training forward's score_mod, mask_mod and BlockMask, shared by all layers (passed where the SDPA path
    passes its float bias)."""

    def __init__(self, position_bias: nn.Module, segment: torch.Tensor, context: torch.Tensor, span: torch.Tensor):
        api = _flex_api()
        b, n = segment.shape
        self.table = position_bias.relative_attention_bias
        buckets, types = position_bias.num_buckets, position_bias.segment_types
        segment, context = segment.long(), context.bool()
        with torch.no_grad():
            # bucket_of_distance with the bound the SDPA path passes (len_q + len_k): the very same lookup table.
            distance = torch.arange(1 - n, n, device=segment.device)
            distance_bucket = position_bias.bucket_of_distance(distance, 2 * n).long()
        table = self.table

        def score_mod(score, b, h, q, k):
            sq, sk = segment[b, q], segment[b, k]
            bucket = torch.where(sq == sk, distance_bucket[k - q + (n - 1)], buckets + sq * types + sk)
            return score + table[bucket, h].to(score.dtype)

        def mask_mod(b, h, q, k):
            seen = context[b, k] | (~context[b, q] & (k <= q))  # context: seen by all; targets: causally
            return seen & (span[b, q] == span[b, k])  # spans are isolated (packing)

        self.score_mod: Callable = score_mod
        self.mask_mod: Callable = mask_mod
        self.shape = (b, n)
        # Once per forward, shared by the layers: mask_mod over the (b, n, n) grid, kept as per-block indices.
        self.block_mask = api.create_block_mask(mask_mod, b, None, n, n, device=segment.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        """softmax(q k^T / sqrt(dim_head) + bias, masked) v for (b, H, n, dim_head) q, k, v."""
        if dropout_p > 0:
            raise dropout_refusal(dropout_p)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, self.table))
        if q.device.type == "cpu" and (needs_grad or torch.compiler.is_compiling()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_bias().to(q.dtype))
        return _kernel(q.device)(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask)

    def dense_bias(self) -> torch.Tensor:
        """The mods evaluated on the whole (b, H, n, n) grid: the float bias, -inf where masked (the CPU backward)."""
        b, n = self.shape
        device = self.table.device
        # Index tensors shaped to broadcast to (b, H, n, n): the mods use only indexing and element-wise ops.
        bi, hi, qi, ki = (torch.arange(size, device=device).view([-1 if d == dim else 1 for d in range(4)])
                          for dim, size in enumerate((b, self.table.shape[1], n, n)))
        bias = self.score_mod(torch.zeros((), dtype=self.table.dtype, device=device), bi, hi, qi, ki)
        allowed = self.mask_mod(bi, hi, qi, ki)  # (b, 1, n, n): the mask does not depend on the head
        return bias.masked_fill(~allowed, float("-inf"))


def _kernel(device: torch.device) -> Callable:
    flex = _flex_api().flex_attention
    if device.type == "cpu" or torch.compiler.is_compiling():
        return flex  # the CPU's unfused reference implementation / the outer torch.compile fuses it
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex)  # uncompiled, flex materialises the scores (no fused kernel)
    return _compiled_flex
