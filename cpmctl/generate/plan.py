"""The memory planner of memory-limited generation: which blocks stay resident, which stream, and what it costs.

What is counted (bytes, from the config alone; nothing is loaded):
- fixed weights: the embeddings (the tied output head included), the position-bias table, the final norm;
- a copy of the output head where the logits are computed from one (`output_head`): int8 with int8-dynamic-head
  (its int8 bytes and scales; fbgemm's packed copy pads the columns, which is not counted), and oneDNN's packed
  layout on the CPU when there is no limit (generate/packed.py; the dtype's bytes; never part of the minimum);
- each transformer block's weights, as laid out in a streaming buffer (int8 + scales, or packed int4 + scales and
  zeros, when quantized: generate/int4.py);
- streaming buffers: two rotating buffers the size of the largest streamed block (one when two do not fit:
  no overlap, but it still runs);
- on an accelerator, the KV cache (keys and values of every attention layer for rows x capacity) and the peak
  activations of the prefill and of a decode step (the logits over the vocabulary included);
- on the CPU device, where the budget counts bytes of weights resident at once, the staging of one tensor while it
  is folded from the memory-mapped checkpoint (cache and activations are shown but not charged).
The plan keeps resident the largest blocks that fit beside the buffers; the rest stream. A budget below the
minimum (fixed weights + one block + cache + activations) fails here, before any weight is read.

plan_memory is the pure sizing; plan_generation checks the inputs of `generate` and `model info` and sizes the plan
of a generation shape with it. The loader (offload.load_planned) takes the finished plan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from cpmctl import CpmctlError
from cpmctl.generate.int4 import check_int4_model
from cpmctl.generate.packed import packing_applies
from cpmctl.generate.quant import (
    check_quantize_name,
    check_quantize_support,
    int8_kernel,
    replace_linears,
    scale_dtype,
)
from cpmctl.model.ant import TransformerBlock
from cpmctl.model.config import CPMAntConfig
from cpmctl.model.generation_config import GenerationConfig

GB = 10**9  # --memory-limit is in GB (10^9 bytes), the stricter reading of "4 GB"
ALIGN = 512  # every tensor of a streaming buffer starts on a 512-byte boundary (CUDA and CPU allocator alignment)
# cuBLAS / cuBLASLt / attention workspaces and allocator rounding. 3b fp16 at 4 GB on an H100 peaked 8 MB above a
# plan made with 64 MiB here (still under the limit): 128 MiB leaves room.
CUDA_WORKSPACE = 128 * 2**20


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of a block inside a flat streaming buffer: module-relative name, shape, dtype, byte offset."""

    name: str
    shape: tuple
    dtype: torch.dtype
    offset: int
    nbytes: int


def block_layout(config: CPMAntConfig, layer: int, dtype: torch.dtype, int8_act: torch.dtype | None,
                 quantize: str | None = "int8", device_type: str = "cpu") -> list[LayoutEntry]:
    """The tensors of block `layer` (parameters and quantized buffers), each at an aligned offset of a flat buffer.
    `int8_act`: the kernel's activation dtype, None = not quantized; `quantize` "int4" lays out Int4Linears,
    packed for `device_type` (the packed shapes differ by device, not the bytes).

    Built from a meta-device TransformerBlock, so the layout always matches the modules the executor binds.
    """
    with torch.device("meta"):
        block = TransformerBlock(config, layer).to(dtype)
    if int8_act is not None:
        replace_linears(block, int8_act, quantize_now=False, quantize=quantize, device_type=device_type)
    entries, offset = [], 0
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        nbytes = t.numel() * t.element_size()
        entries.append(LayoutEntry(name, tuple(t.shape), t.dtype, offset, nbytes))
        offset = _align(offset + nbytes)
    return entries


def layout_bytes(entries: list[LayoutEntry]) -> int:
    return _align(entries[-1].offset + entries[-1].nbytes) if entries else 0


def fixed_bytes(config: CPMAntConfig, dtype: torch.dtype) -> int:
    e, d = dtype_bytes(dtype), config.dim_model
    rows = config.vocab_size + config.num_prompts + config.segment_types
    bias = (config.segment_types**2 + config.position_bias_num_buckets) * config.num_heads
    return (rows * d + bias + d) * e


def kv_cache_bytes(config: CPMAntConfig, dtype: torch.dtype, rows: int, capacity: int) -> int:
    per_layer = 2 * rows * config.num_heads * capacity * config.dim_head * dtype_bytes(dtype)
    return config.num_attention_kept * per_layer + rows * capacity * (8 + 1 + 8)  # + segment, context, span


def activation_bytes(config: CPMAntConfig, dtype: torch.dtype, rows: int, prefill: int, capacity: int,
                     int8: bool, dequant: bool = False) -> int:
    """Peak transient memory of one forward (prefill of `prefill` tokens, or one step against `capacity` keys)
    plus the decoding loop's work on the last logits. An upper bound read off CPMAnt.forward, block by block."""
    e = dtype_bytes(dtype)
    d, ff, v = config.dim_model, config.dim_ff, config.vocab_size
    inner = config.num_heads * config.dim_head

    def forward_peak(n_q: int, n_k: int) -> int:
        pairs = rows * n_q * n_k
        bias = pairs * config.num_heads * e  # the (b, H, q, k) bias, alive through the encoder
        bias_build = 2 * bias + pairs * 21  # table lookup + masked copy + int32/fp32 bucket temporaries
        hidden = rows * n_q * d
        norm = hidden * (12 + 2 * e)  # fp32 statistics of RMSNorm
        attention = 8 * rows * n_q * inner * e + hidden * e
        ffn = 4 * rows * n_q * ff * e + hidden * e
        widest = max(d, ff, inner)
        int8_io = rows * n_q * widest * (4 + e) if int8 else 0  # bf16 input (padded) and output before the cast
        if dequant:  # the dequantizing kernel builds the weight in the model dtype, then scales it
            int8_io += 2 * max(ff * d, inner * d) * e
        block = 2 * hidden * e + max(norm, attention, ffn) + int8_io
        logits = rows * v * (e + 4)
        return max(bias_build, bias + max(4 * hidden * e, block, logits))

    loop = rows * v * 4 * 4  # repetition penalty, log-softmax and beam scores in fp32
    return max(forward_peak(prefill, prefill), forward_peak(1, capacity)) + loop


def staging_per_weight(quantize: str | None) -> int:
    """Bytes of temporaries per weight while one tensor is folded (and quantized): two fp32 copies; int4 adds its
    uint8 codes and the int32 codes the CPU packing takes (generate/int4.py: ~9 at the peak, 10 charged)."""
    return 10 if quantize == "int4" else 8


def staging_bytes(config: CPMAntConfig, quantize: str | None = None) -> int:
    """CPU device: the fp32 temporaries of folding (and quantizing) the largest tensor read from the mapping."""
    d, ff, inner = config.dim_model, config.dim_ff, config.num_heads * config.dim_head
    return max(ff * d, inner * d) * staging_per_weight(quantize)


@dataclass
class MemoryPlan:
    device_type: str  # cuda | cpu
    dtype: str
    quantize: str | None
    budget: int | None  # bytes; None = no limit (everything resident)
    batch_rows: int
    prefill_length: int
    capacity: int
    fixed_bytes: int
    block_bytes: list[int]
    resident: list[int] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    num_slots: int = 0
    slot_bytes: int = 0
    staging_bytes: int = 0
    cache_bytes: int = 0
    activation_bytes: int = 0
    workspace_bytes: int = 0
    minimum_bytes: int = 0
    output_head: str | None = None  # the head copy the logits use: "int8" (int8-dynamic-head), "onednn", or none
    head_bytes: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the plan was sized for, which the loader loads in."""
        return getattr(torch, self.dtype)

    @property
    def weight_bytes(self) -> int:
        """Weights on the device at once: fixed + head copy + resident blocks + the streaming buffers."""
        return self.fixed_bytes + self.head_bytes + sum(self.block_bytes[i] for i in self.resident) + self.num_slots * self.slot_bytes

    @property
    def charged_bytes(self) -> int:
        """What the budget is compared with: everything on an accelerator, weights (+ staging) on the CPU."""
        if self.device_type == "cpu":
            return self.weight_bytes + self.staging_bytes
        return self.weight_bytes + self.cache_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per forward pass."""
        return sum(self.block_bytes[i] for i in self.streamed)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["block_bytes"]
        out.update(weight_bytes=self.weight_bytes, charged_bytes=self.charged_bytes,
                   streamed_bytes_per_step=self.streamed_bytes, num_blocks=len(self.block_bytes))
        return out


def _base_bytes(plan: MemoryPlan) -> int:
    """Everything charged except resident blocks and buffers."""
    if plan.device_type == "cpu":
        return plan.fixed_bytes + plan.head_bytes + plan.staging_bytes
    return plan.fixed_bytes + plan.head_bytes + plan.cache_bytes + plan.activation_bytes + plan.workspace_bytes


def plan_memory(
    config: CPMAntConfig,
    *,
    device_type: str,
    dtype: torch.dtype,
    budget: int | None,
    quantize: str | None = None,
    batch_rows: int = 1,
    prefill_length: int = 64,
    capacity: int = 256,
) -> MemoryPlan:
    """Decide resident vs streamed blocks for `budget` bytes (see the module docstring for what is counted)."""
    if device_type not in ("cuda", "cpu"):
        raise CpmctlError(f"memory planning supports cuda and cpu devices, not '{device_type}'")
    if quantize == "int4":
        check_int4_model(config)
    int8_act = scale_dtype(device_type, dtype, quantize) if quantize else None  # int8 (or int4) weights in every mode
    blocks = [layout_bytes(block_layout(config, i, dtype, int8_act, quantize, device_type))
              for i in range(config.num_layers)]
    plan = MemoryPlan(
        device_type=device_type,
        dtype=str(dtype).replace("torch.", ""),
        quantize=quantize,
        budget=budget,
        batch_rows=batch_rows,
        prefill_length=prefill_length,
        capacity=capacity,
        fixed_bytes=fixed_bytes(config, dtype),
        block_bytes=blocks,
        cache_bytes=kv_cache_bytes(config, dtype, batch_rows, capacity),
        activation_bytes=activation_bytes(config, dtype, batch_rows, prefill_length, capacity, int8_act is not None,
                                          quantize not in (None, "int4") and int8_kernel(device_type) == "dequant"),
        workspace_bytes=CUDA_WORKSPACE if device_type == "cuda" else 0,
    )
    if quantize == "int8-dynamic-head":
        plan.output_head, plan.head_bytes = "int8", config.vocab_size * (config.dim_model + 4)
    streamable = [i for i in range(config.num_layers) if blocks[i] > 0]
    if device_type == "cpu" and streamable:
        plan.staging_bytes = staging_bytes(config, quantize)
    base = _base_bytes(plan)
    plan.minimum_bytes = base + (max(blocks[i] for i in streamable) if streamable else 0)
    if budget is None:
        plan.resident = streamable
        if plan.output_head is None and packing_applies(device_type, dtype):  # no limit to keep: the faster head
            plan.output_head, plan.head_bytes = "onednn", config.vocab_size * config.dim_model * dtype_bytes(dtype)
        return plan
    if budget < plan.minimum_bytes:
        raise CpmctlError(
            f"--memory-limit {budget / GB:.3g} GB is below the minimum of {plan.minimum_bytes / GB:.3g} GB for "
            f"this model on {device_type} ({_minimum_parts(plan, blocks, streamable)})"
        )
    # Largest blocks first: what stays resident is never copied, and the buffers shrink to the largest streamed.
    order = sorted(streamable, key=lambda i: (-blocks[i], i))
    for slots in (2, 1):
        for keep in range(len(order), -1, -1):
            resident, streamed = order[:keep], order[keep:]
            slot = max((blocks[i] for i in streamed), default=0)
            n_slots = slots if streamed else 0
            if base + sum(blocks[i] for i in resident) + n_slots * slot <= budget:
                plan.resident, plan.streamed = sorted(resident), sorted(streamed)
                plan.num_slots, plan.slot_bytes = n_slots, slot
                return plan
    raise AssertionError("unreachable: the minimum check admits one buffer")


def _minimum_parts(plan: MemoryPlan, blocks: list[int], streamable: list[int]) -> str:
    parts = [f"embeddings {plan.fixed_bytes / GB:.3g} GB",
             f"one block {max((blocks[i] for i in streamable), default=0) / GB:.3g} GB"]
    if plan.device_type == "cpu":
        parts.append(f"staging {plan.staging_bytes / GB:.3g} GB")
    else:
        parts += [f"KV cache {plan.cache_bytes / GB:.3g} GB", f"activations {plan.activation_bytes / GB:.3g} GB"]
    return " + ".join(parts)


# ----- inputs of a plan ----------------------------------------------------------------------------------------
def device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit_bytes(limit_gb: float | None, device: torch.device) -> int | None:
    """--memory-limit GB -> bytes, rejecting non-positive values and limits beyond what the device has."""
    if limit_gb is None:
        return None
    if not math.isfinite(limit_gb) or limit_gb <= 0:
        raise CpmctlError(f"--memory-limit must be a positive number of GB, got {limit_gb}")
    budget = int(limit_gb * GB)
    total = device_total_bytes(device)
    if budget > total:
        raise CpmctlError(f"--memory-limit {limit_gb:g} GB is more than {device} has ({total / GB:.1f} GB)")
    return budget


def generation_shape(config: CPMAntConfig, prompt_tokens: list[int], batch_size: int, decode: str,
                     beam_size: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(rows, prefill length, cache capacity) of decoding prompts of these token counts, as decode.py sizes them:
    the 32 prompt slots + the longest prompt; up to max_new_tokens + 3 cached steps (beam search's limit + 2).
    Beam search expands the prompt's cache to batch x beam rows while the batch's own cache still exists: both
    are counted."""
    batch = min(batch_size, len(prompt_tokens))
    rows = batch * (beam_size + 1) if decode == "beam" else batch
    prefill = config.prompt_length + max(prompt_tokens)
    return rows, prefill, prefill + max_new_tokens + 3


def format_blocks(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    if not indices:
        return "-"
    runs, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return ",".join(runs)


def plan_generation(
    config: CPMAntConfig,
    prompt_tokens: Sequence[int],
    *,
    decoding: GenerationConfig,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    memory_limit_gb: float | None,
    quantize: str | None = None,
    batch_option: str = "--batch-size",
) -> MemoryPlan:
    """The plan of decoding prompts of these token counts (`<s>` included, the prompt slots not), `batch_size` at a
    time, with `decoding`: the one place where `generate --memory-limit/--quantize` and `model info --memory-limit`
    check their inputs (quantize name, shape, the limit against the device, kernel support, in that order) before
    sizing with plan_memory. `batch_option` is the flag named when the batch is out of range (`model info` plans
    for --batch-rows rows: greedy, so rows = batch)."""
    check_quantize_name(quantize)
    if batch_size < 1:
        raise CpmctlError(f"{batch_option} must be >= 1, got {batch_size}")
    if not prompt_tokens:
        raise CpmctlError("no prompts to plan for")
    if min(prompt_tokens) < 1:
        raise CpmctlError(f"--prompt-tokens must be >= 1, got {min(prompt_tokens)}")
    decoding.validate()
    budget = memory_limit_bytes(memory_limit_gb, device)
    if quantize:
        check_quantize_support(quantize, device, dtype)
    rows, prefill, capacity = generation_shape(config, list(prompt_tokens), batch_size, decoding.decode,
                                               decoding.beam_size, decoding.max_new_tokens)
    return plan_memory(config, device_type=device.type, dtype=dtype, budget=budget, quantize=quantize,
                       batch_rows=rows, prefill_length=prefill, capacity=capacity)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", GB), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} B"


def plan_table(plan: MemoryPlan) -> list[tuple[str, str]]:
    """Human rows of a plan (label, value) for `model info`."""
    gb = human_bytes
    rows = [
        ("device", f"{plan.device_type} ({plan.dtype}{f', {plan.quantize} linears' if plan.quantize else ''})"),
        ("memory limit", gb(plan.budget) if plan.budget is not None else "none"),
        ("resident blocks", f"{len(plan.resident)}: {format_blocks(plan.resident)}"),
        ("streamed blocks", f"{len(plan.streamed)}: {format_blocks(plan.streamed)}"),
        ("streaming buffers", f"{plan.num_slots} x {gb(plan.slot_bytes)}"),
        ("fixed weights", gb(plan.fixed_bytes)),
        *([(f"output head copy ({plan.output_head})", gb(plan.head_bytes))] if plan.output_head else []),
        ("weights on device", gb(plan.weight_bytes)),
        ("streamed per step", gb(plan.streamed_bytes)),
        (f"KV cache ({plan.batch_rows} rows x {plan.capacity})", gb(plan.cache_bytes)),
        (f"activations (prefill {plan.prefill_length})", gb(plan.activation_bytes)),
    ]
    if plan.device_type == "cpu":
        rows.append(("staging", gb(plan.staging_bytes)))
    rows += [("expected (charged to the limit)", gb(plan.charged_bytes)), ("minimum limit", gb(plan.minimum_bytes))]
    return rows
