"""The CPM-Ant network in one file.

Names and state-dict keys follow the original (cpm-live `cpm-ant` branch). The original computes every linear as
(x @ W.T) / sqrt(in) and every embedding as E[ids] / sqrt(dim_model); here those factors are folded into the
weights, so each layer is a plain nn.Linear / nn.Embedding (the HF transformers layout). checkpoint.py unfolds on
export. See shared/reference/cpm-ant.md sections 3 and 4 for the maths.

Token ids are one id space: 0..vocab_size-1 are vocabulary tokens, vocab_size + j is prompt slot j
(j = 32 * task_id + position), looked up in `prompt_embedding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cpmctl.model.config import CPMAntConfig
from cpmctl.model.flex_attention import FlexMask

EMBEDDING_INIT_STD = 0.02  # input, prompt and segment embeddings, before the 1/sqrt(dim_model) factor
FEW_ROWS = 16  # up to this many rows the CPU head is computed as E @ h^T (CPMAnt.logits)


class RMSNorm(nn.Module):
    """Weight-only RMS norm; statistics in fp32 as in the original."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dtype == torch.float32:
            # The same maths (bit for bit) in one call: a decode step runs 2 * num_layers + 1 norms on one row,
            # where the dispatch of six element-wise ops costs more than their arithmetic.
            return F.rms_norm(h, self.weight.shape, self.weight, self.eps)
        variance = h.float().pow(2).mean(dim=-1, keepdim=True)
        return (h * torch.rsqrt(variance + self.eps)).to(h.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        inner = config.num_heads * config.dim_head
        self.project_q = nn.Linear(config.dim_model, inner, bias=False)
        self.project_k = nn.Linear(config.dim_model, inner, bias=False)
        self.project_v = nn.Linear(config.dim_model, inner, bias=False)
        self.attention_out = nn.Linear(inner, config.dim_model, bias=False)
        self.dropout_p = config.dropout_p
        # Pruning sets a (num_heads,) gate that scales each head's output; None = no gate.
        self.head_gate: torch.Tensor | None = None

    def forward(self, x, bias, cache: "KVCache | None" = None, layer: int = 0):
        b, n, _ = x.shape
        heads = (b, n, self.num_heads, self.dim_head)
        if n == 1:  # a decode step: (b, 1, H * D) is already (b, H, 1, D) in memory, no transposes needed
            heads = (b, self.num_heads, 1, self.dim_head)
        q, k, v = (self.project_q(x).view(heads), self.project_k(x).view(heads), self.project_v(x).view(heads))
        if n > 1:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append_kv(layer, k, v)
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(bias, FlexMask):  # train.attention=flex: the bias and mask as FlexAttention mods
            out = bias.attend(q, k, v, dropout_p)
        else:
            # score = q k^T / sqrt(dim_head) + bias (bias holds -inf where masked); SDPA's default scale is the same.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
        if self.head_gate is not None:
            out = out * self.head_gate.view(1, -1, 1, 1).to(out.dtype)
        if n > 1:
            out = out.transpose(1, 2)
        return self.attention_out(out.reshape(b, n, self.num_heads * self.dim_head))


class SelfAttentionBlock(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.layernorm_before_attention = RMSNorm(config.dim_model, config.eps)
        self.self_attention = Attention(config)

    def forward(self, h, bias, cache=None, layer=0):
        return self.self_attention(self.layernorm_before_attention(h), bias, cache, layer)


class GatedGELU(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)

    def forward(self, x):
        return F.gelu(self.w_0(x)) * self.w_1(x)


class FeedForward(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.w_in = GatedGELU(config)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.dropout_p = config.dropout_p
        # Pruning sets a (dim_ff,) gate on the intermediate channels; None = no gate.
        self.channel_gate: torch.Tensor | None = None

    def forward(self, x):
        x = self.w_in(x)
        if self.channel_gate is not None:
            x = x * self.channel_gate.to(x.dtype)
        if self.training:
            x = F.dropout(x, self.dropout_p, self.training)
        return self.w_out(x)


class FFNBlock(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.layernorm_before_ffn = RMSNorm(config.dim_model, config.eps)
        self.ffn = FeedForward(config)

    def forward(self, h):
        return self.ffn(self.layernorm_before_ffn(h))


class TransformerBlock(nn.Module):
    """Pre-norm block with plain residuals. A sub-block dropped by mask_modules is None (identity residual)."""

    def __init__(self, config: CPMAntConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self_att = SelfAttentionBlock(config) if config.has_attention(layer) else None
        self.ffn = FFNBlock(config) if config.has_ffn(layer) else None
        self.dropout_p = config.dropout_p
        # Pruning sets scalar gates on whole sub-blocks; None = no gate.
        self.attention_gate: torch.Tensor | None = None
        self.ffn_gate: torch.Tensor | None = None

    def forward(self, h, bias, cache=None):
        # The original applies dropout to each residual branch before adding it (layers/blocks.py), besides the
        # attention probabilities and the FFN intermediate.
        # (Not called at all in eval: a decode step would pay two dispatches per block for nothing.)
        drop = (lambda t: F.dropout(t, self.dropout_p, True)) if self.training else (lambda t: t)  # noqa: E731
        if self.self_att is not None:
            out = drop(self.self_att(h, bias, cache, self.layer))
            h = h + (out if self.attention_gate is None else out * self.attention_gate.to(out.dtype))
        if self.ffn is not None:
            out = drop(self.ffn(h))
            h = h + (out if self.ffn_gate is None else out * self.ffn_gate.to(out.dtype))
        return h


class SegmentPositionBias(nn.Module):
    """One relative position / segment bias table shared by all layers."""

    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.num_buckets = config.position_bias_num_buckets
        self.max_distance = config.position_bias_max_distance
        self.segment_types = config.segment_types
        self.relative_attention_bias = nn.Parameter(
            torch.empty(config.segment_types**2 + config.position_bias_num_buckets, config.num_heads)
        )

    def position_bucket(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        max_exact = half // 2
        bucket = (rel > 0).to(torch.int32) * half
        r = rel.abs()
        large = max_exact + (
            torch.log(r.float() / max_exact) / math.log(self.max_distance / max_exact) * (half - max_exact)
        ).to(torch.int32)
        large = large.clamp(max=half - 1)
        return bucket + torch.where(r < max_exact, r.to(torch.int32), large)

    def bucket_of_distance(self, rel: torch.Tensor, max_distance: int) -> torch.Tensor:
        """position_bucket(rel) for |rel| <= max_distance, read from a table that position_bucket itself fills (so
        the buckets are identical): one gather per step instead of a dozen element-wise ops with a log."""
        table = getattr(self, "_bucket_table", None)
        if table is None or table.device != rel.device or table.shape[0] < 2 * max_distance + 1:
            half_width = max(max_distance, 1024)
            table = self.position_bucket(torch.arange(-half_width, half_width + 1, device=rel.device))
            self._bucket_table = table
        return table[rel + table.shape[0] // 2]

    def forward(self, q_seg, q_pos, k_seg, k_pos) -> torch.Tensor:
        """Bias (b, H, len_q, len_k): distance buckets within a segment, segment-pair buckets across.

        Positions are indices in the sequence (0 <= q_pos, k_pos < len_q + len_k), as CPMAnt.forward builds them."""
        with torch.no_grad():
            same = q_seg[:, :, None] == k_seg[:, None, :]
            bound = q_pos.shape[-1] + k_pos.shape[-1]
            by_distance = self.bucket_of_distance(k_pos[:, None, :] - q_pos[:, :, None], bound)
            by_segment = self.num_buckets + q_seg[:, :, None] * self.segment_types + k_seg[:, None, :]
            bucket = torch.where(same, by_distance, by_segment.to(torch.int32))
        return F.embedding(bucket, self.relative_attention_bias).permute(0, 3, 1, 2)


def attention_allowed(q_ctx, q_span, q_pos, k_ctx, k_span, k_pos) -> torch.Tensor:
    """The prefix-LM mask (b, len_q, len_k): a context token is seen by everyone in its span, a token to predict
    only causally."""
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    allowed = k_ctx[:, None, :] | (~q_ctx[:, :, None] & causal)
    return allowed & (q_span[:, :, None] == k_span[:, None, :])


@dataclass
class KVCache:
    """Preallocated keys/values per layer plus the key-side metadata the mask and bias need."""

    k: list
    v: list
    segment: torch.Tensor
    context: torch.Tensor
    span: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, model: "CPMAnt", batch: int, max_length: int, device=None, dtype=None):
        config = model.config
        device = device or model.input_embedding.weight.device
        dtype = dtype or model.input_embedding.weight.dtype
        shape = (batch, config.num_heads, max_length, config.dim_head)
        ks, vs = [], []
        for i in range(config.num_layers):
            has = config.has_attention(i)
            ks.append(torch.empty(shape, device=device, dtype=dtype) if has else None)
            vs.append(torch.empty(shape, device=device, dtype=dtype) if has else None)
        meta = lambda t: torch.zeros(batch, max_length, device=device, dtype=t)  # noqa: E731
        return cls(ks, vs, meta(torch.long), meta(torch.bool), meta(torch.long))

    @property
    def capacity(self) -> int:
        return self.segment.shape[1]

    def append_meta(self, segment, context, span) -> None:
        n = segment.shape[1]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {n} > {self.capacity}")
        s = slice(self.length, self.length + n)
        self.segment[:, s], self.context[:, s], self.span[:, s] = segment, context, span

    def append_kv(self, layer: int, k, v):
        n = k.shape[2]
        end = self.length + n
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor, start: int = 0) -> None:
        """Select batch rows (beam search): keys, values and metadata follow the chosen beams.

        With `start`, only positions start..length-1 are gathered (in place): beam search passes the prompt length,
        since the beams of one prompt share their prompt positions and only the generated ones differ."""
        if start == 0 or index.numel() != self.segment.shape[0]:
            for store in (self.k, self.v):
                for i, t in enumerate(store):
                    if t is not None:
                        store[i] = t.index_select(0, index)
            self.segment = self.segment.index_select(0, index)
            self.context = self.context.index_select(0, index)
            self.span = self.span.index_select(0, index)
            return
        s = slice(start, self.length)
        for store in (self.k, self.v):
            for t in store:
                if t is not None:
                    t[:, :, s] = t[:, :, s].index_select(0, index)
        for t in (self.segment, self.context, self.span):
            t[:, s] = t[:, s].index_select(0, index)


class Encoder(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.output_layernorm = RMSNorm(config.dim_model, config.eps)
        self.gradient_checkpointing = False

    def forward(self, h, bias, cache=None):
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, bias, use_reentrant=False)
            else:
                h = block(h, bias, cache)
        return self.output_layernorm(h)


class CPMAnt(nn.Module):
    def __init__(self, config: CPMAntConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim_model)
        self.prompt_embedding = nn.Embedding(config.num_prompts, config.dim_model)
        self.segment_embedding = nn.Embedding(config.segment_types, config.dim_model)
        self.position_bias = SegmentPositionBias(config)
        self.encoder = Encoder(config)
        # "sdpa" | "flex" (train.attention, model/flex_attention.py): forwards without a cache; decoding keeps SDPA.
        self.attention_kernel = "sdpa"

    # ----- init -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The original init, then folded: linears and the position-bias table std 1 before folding (folded: std
        1/sqrt(fan_in); the bias table has no factor), the input, prompt and segment embeddings std 0.02 before
        the 1/sqrt(dim_model) factor (folded: 0.02/sqrt(dim_model)); layer norms 1."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, generator, p.dtype))

    def initial_value(self, name: str, shape, generator: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
        """One parameter's initial value (init_weights). Parameters are drawn one after another from `generator` in
        named_parameters() order, so a sharded start (train/sharded_start.py) that draws each whole parameter and
        keeps its own rows gets the same bits as a single process."""
        if name.endswith("layernorm_before_attention.weight") or name.endswith("layernorm_before_ffn.weight") or (
            name == "encoder.output_layernorm.weight"
        ):
            return torch.ones(shape, dtype=dtype)
        std = 1.0
        if name.endswith("embedding.weight"):
            std = EMBEDDING_INIT_STD / math.sqrt(self.config.dim_model)
        elif len(shape) == 2 and not name.startswith("position_bias"):
            std = 1.0 / math.sqrt(shape[1])
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype).mul_(std)

    # ----- inputs ---------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        vocab = self.config.vocab_size
        is_prompt = ids >= vocab
        words = self.input_embedding(ids.clamp(max=vocab - 1))
        prompts = self.prompt_embedding((ids - vocab).clamp(min=0))
        h = torch.where(is_prompt[..., None], prompts, words)
        return h + self.segment_embedding(segment)

    def attention_bias(self, q_seg, q_ctx, q_span, q_pos, k_seg, k_ctx, k_span, k_pos) -> torch.Tensor:
        bias = self.position_bias(q_seg, q_pos, k_seg, k_pos)
        allowed = attention_allowed(q_ctx, q_span, q_pos, k_ctx, k_span, k_pos)
        return bias.masked_fill(~allowed[:, None], float("-inf"))

    # ----- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        input: torch.Tensor,
        segment: torch.Tensor,
        context: torch.Tensor,
        span: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (b, n, vocab_size) for ids `input` (b, n).

        `context` (bool): True = given token (seen bidirectionally), False = token to predict (seen causally).
        `span`: tokens only see tokens of the same span (packing). With `cache`, the new tokens are appended after
        the cached ones; positions are indices in the full sequence.
        """
        b, n = input.shape
        context = context.bool()
        span = torch.zeros_like(input) if span is None else span
        start = cache.length if cache is not None else 0
        q_pos = torch.arange(start, start + n, device=input.device)[None].expand(b, n)
        if cache is not None:
            cache.append_meta(segment, context, span)
            end = start + n
            k_seg, k_ctx, k_span = cache.segment[:, :end], cache.context[:, :end], cache.span[:, :end]
            k_pos = torch.arange(end, device=input.device)[None].expand(b, end)
        else:
            k_seg, k_ctx, k_span, k_pos = segment, context, span, q_pos
        if cache is None and self.attention_kernel == "flex":
            bias = FlexMask(self.position_bias, segment, context, span)
        else:
            bias = self.attention_bias(segment, context, span, q_pos, k_seg, k_ctx, k_span, k_pos)
        h = self.embed(input, segment)
        h = self.encoder(h, bias, cache)
        if cache is not None:
            cache.length += n
        if last_only:
            h = h[:, -1:]
        if return_hidden:
            return h
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # Tied head: (h / sqrt(d)) @ E^T with E unfolded equals h @ E_folded^T.
        weight = self.input_embedding.weight
        rows = h.numel() // h.shape[-1]
        if h.device.type == "cpu" and 1 < rows <= FEW_ROWS:
            # A decode step of a few rows: the CPU BLAS runs h @ E^T for a handful of rows at about half the speed of
            # E @ h^T over the 30,720-row head (bench/generate.py, batch mode). The same product, summed in another
            # order (last-bit differences), so a single row (batch 1 greedy) keeps the plain path.
            # Copied into a tensor of the final shape (not a view of one): FSDP2 warns about view outputs.
            out = h.new_empty(*h.shape[:-1], weight.shape[0])
            out.view(rows, -1).copy_(torch.mm(weight, h.reshape(rows, -1).t()).t())
            return out
        return F.linear(h, weight)


def build_model(config: CPMAntConfig, device="cpu", dtype=torch.float32, seed: int | None = None) -> CPMAnt:
    with torch.device(device):
        model = CPMAnt(config).to(dtype)
    if device != "meta":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        model.init_weights(gen)
    return model


def param_counts(config: CPMAntConfig) -> dict[str, int]:
    """Total / embedding / non-embedding parameter counts, from a model built on the meta device."""
    model = build_model(config, device="meta")
    total = embedding = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.endswith("embedding.weight"):
            embedding += p.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
