"""Memory-limited execution: some transformer blocks stay on the device, the others stream into two rotating
buffers just ahead of their turn (the BMInf idea, built on plain PyTorch).

The model is an ordinary CPMAnt, so decode.py's greedy / sampling / beam search run on it unchanged. A streamed
block's parameters are placeholders on the meta device; a forward pre-hook binds them to views of the buffer that
holds the block, and starts copying the next streamed block into the other buffer; a forward hook unbinds them and
marks the buffer free. On CUDA the copy runs on a side stream from pinned host memory (one flat copy per block) and
the compute stream waits on an event; on the CPU device prefetching asks the OS to read the block's pages of the
memory-mapped checkpoint ahead, and the block is folded into its buffer when it runs (with int8 / int4 linears it
is quantized once at load into a mapped scratch file and copied from there). Either way the arithmetic is the
same as the fully resident model's, so the outputs are bit-identical. Where blocks come from: block_source.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cpmctl import CpmctlError
from cpmctl.generate.block_source import (
    BLOCK_PREFIX,
    SCRATCH_ENV,
    MappedStore,
    MemoryLedger,
    PinnedHostStore,
    ScratchStore,
    block_tensors,
    buffer_views,
    scratch_dir,
)
from cpmctl.generate.plan import GB, MemoryPlan, block_layout, format_blocks, layout_bytes, plan_memory
from cpmctl.generate.quant import check_quantize_name, check_quantize_support, replace_linears, scale_dtype
from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.checkpoint import CheckpointInfo
from cpmctl.model.mapped import MappedCheckpoint

def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name` (dotted) without copying it."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


# ----- the executor --------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    flat: torch.Tensor
    owner: int | None = None  # the block loaded (or loading) here
    ready: object = None  # CUDA: event of the finished copy; CPU: True once filled, False while only prefetched
    free: object = None  # CUDA event recorded when the last block using it finished
    bindings: dict = field(default_factory=dict)  # layer -> views of this buffer in that block's layout


class BlockStreamer:
    """Binds streamed blocks to rotating device buffers around their forward, prefetching the next one."""

    def __init__(self, model: CPMAnt, plan: MemoryPlan, store, layouts: dict, device: torch.device,
                 ledger: MemoryLedger):
        self.model, self.plan, self.store, self.layouts, self.device = model, plan, store, layouts, device
        self.ledger = ledger
        self.order = list(plan.streamed)
        self.next_of = {layer: self.order[(j + 1) % len(self.order)] for j, layer in enumerate(self.order)}
        self.slots = []
        for _ in range(plan.num_slots):
            self.slots.append(_Slot(torch.empty(plan.slot_bytes, dtype=torch.uint8, device=device)))
            ledger.charge("buffers", plan.slot_bytes)
        self.placeholders = {
            layer: [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in layouts[layer]] for layer in self.order
        }
        self.bound: tuple[int, _Slot] | None = None
        self.loads = 0  # blocks copied to the device so far
        self.cuda = device.type == "cuda"
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None
        self.hooks = []
        for layer in self.order:
            block = model.encoder.layers[layer]
            self._bind(block, layer, self.placeholders[layer])
            self.hooks.append(block.register_forward_pre_hook(self._before))
            self.hooks.append(block.register_forward_hook(self._after))
        if self.cuda:  # the buffers were allocated on the compute stream: order the first copies after it
            self.side_stream.wait_stream(torch.cuda.current_stream(device))
        self._prefetch(self.order[0])

    # -- slots --
    def _slot_of(self, layer: int) -> _Slot | None:
        return next((s for s in self.slots if s.owner == layer), None)

    def _free_slot(self) -> _Slot | None:
        busy = self.bound[1] if self.bound else None
        return next((s for s in self.slots if s is not busy and s.owner is None), None)

    def _start_fill(self, layer: int, slot: _Slot) -> None:
        slot.owner = layer
        self.loads += 1
        if self.cuda:
            with torch.cuda.stream(self.side_stream):
                if slot.free is not None:
                    self.side_stream.wait_event(slot.free)
                self.store.fill(layer, slot.flat)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.side_stream)
        else:
            self.store.prefetch(layer)
            slot.ready = False

    def _wait_ready(self, slot: _Slot) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        elif not slot.ready:
            self.store.fill(slot.owner, slot.flat)
            slot.ready = True

    def _evict(self) -> _Slot:
        busy = self.bound[1] if self.bound else None
        slot = next(s for s in self.slots if s is not busy)
        self._wait_ready(slot)
        slot.owner, slot.ready = None, None
        return slot

    def _prefetch(self, layer: int) -> None:
        if self._slot_of(layer) is None:
            slot = self._free_slot()
            if slot is not None:
                self._start_fill(layer, slot)

    # -- binding --
    def _bind(self, block: nn.Module, layer: int, tensors: list[torch.Tensor]) -> None:
        for entry, t in zip(self.layouts[layer], tensors):
            _set_tensor(block, entry.name, t)

    def _before(self, block: nn.Module, args) -> None:
        layer = block.layer
        slot = self._slot_of(layer)
        if slot is None:  # not prefetched (blocks run out of order): load it now, over a pending prefetch
            slot = self._free_slot() or self._evict()
            self._start_fill(layer, slot)
        self._wait_ready(slot)
        if layer not in slot.bindings:
            slot.bindings[layer] = buffer_views(slot.flat, self.layouts[layer])
        self._bind(block, layer, slot.bindings[layer])
        self.bound = (layer, slot)
        self._prefetch(self.next_of[layer])  # into the other buffer, while this block computes

    def _after(self, block: nn.Module, args, output) -> None:
        layer, slot = self.bound
        self._bind(block, layer, self.placeholders[layer])
        if self.cuda:
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))
        slot.owner, slot.ready, self.bound = None, None, None
        self._prefetch(self.next_of[layer])  # one buffer: the next block can only load now

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----- loading -------------------------------------------------------------------------------------------------
@dataclass
class OffloadedModel:
    """A CPMAnt whose weights follow a MemoryPlan; `model` is what decode.py runs."""

    model: CPMAnt
    plan: MemoryPlan
    info: CheckpointInfo
    ledger: MemoryLedger
    streamer: BlockStreamer | None = None

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()


def load_planned(
    path: str | Path,
    plan: MemoryPlan,
    *,
    device: torch.device | str,
    on_progress: Callable[[str], None] | None = None,
) -> OffloadedModel:
    """Load a native or original checkpoint lazily on `device` as `plan` says (from plan_generation, or
    plan_memory for an exact shape), in the plan's dtype, int8 / int4 linears where it is quantized.

    Fixed weights and resident blocks are folded tensor by tensor onto the device; streamed blocks go to pinned
    host memory (CUDA) or stay in the mapped file (CPU).
    """
    device = _normalized(device)
    if device.type != plan.device_type:
        raise CpmctlError(f"the memory plan is for {plan.device_type}, not {device}")
    dtype = plan.torch_dtype
    ckpt = MappedCheckpoint(path)
    config = ckpt.config
    int8_act = scale_dtype(device, dtype, plan.quantize) if plan.quantize else None
    layouts = {i: block_layout(config, i, dtype, int8_act, plan.quantize, device.type)
               for i in range(config.num_layers)}
    # A plan sized for another config would overrun its buffers: the block sizes must be this checkpoint's.
    if [layout_bytes(layouts[i]) for i in range(config.num_layers)] != plan.block_bytes:
        raise CpmctlError(f"{path}: the memory plan was made for another model config")
    ledger = MemoryLedger()

    model = build_model(config, device="meta", dtype=dtype)
    if int8_act is not None:
        for block in model.encoder.layers:
            replace_linears(block, int8_act, quantize_now=False, quantize=plan.quantize, device_type=device.type)
    for key in ckpt.keys():
        if not key.startswith(BLOCK_PREFIX + "."):
            t = _to_device(ckpt.folded(key, dtype), ckpt, device)
            ckpt.release(key)
            _set_tensor(model, key, t)
            ledger.charge("fixed", t.numel() * t.element_size())
    for layer in plan.resident:
        block = model.encoder.layers[layer]
        for entry, t in block_tensors(ckpt, layer, layouts[layer], dtype, ledger, pack_device=device):
            t = _to_device(t, ckpt, device)
            _set_tensor(block, entry.name, t)
            ledger.charge("resident", t.numel() * t.element_size())
        if on_progress:
            on_progress(f"block {layer} resident")
    streamer = None
    if plan.streamed:
        if device.type == "cuda":
            store = PinnedHostStore(ckpt, plan.streamed, layouts, dtype, device)
        elif plan.quantize:
            store = _scratch_or_mapped(ckpt, plan, layouts, dtype, ledger)
        else:
            store = MappedStore(ckpt, layouts, dtype, ledger)
        streamer = BlockStreamer(model, plan, store, layouts, device, ledger)
    model.eval()
    return OffloadedModel(model, plan, ckpt.info, ledger, streamer)


def _scratch_or_mapped(ckpt: MappedCheckpoint, plan: MemoryPlan, layouts: dict, dtype: torch.dtype,
                       ledger: MemoryLedger):
    """CPU, quantized: the streamed blocks quantized once into a scratch file, or, where none can be written,
    quantized again at every use (slower, the same numbers), said in one warning."""
    directory = scratch_dir()
    try:
        return ScratchStore(ckpt, plan.streamed, layouts, dtype, ledger, directory)
    except OSError as e:
        warnings.warn(f"--quantize {plan.quantize}: streamed blocks are quantized again at every use (slower): no "
                      f"scratch file in {directory} ({e.strerror or e}); set {SCRATCH_ENV} to a writable directory",
                      stacklevel=2)
        return MappedStore(ckpt, layouts, dtype, ledger)


def load_offloaded(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    budget: int | None = None,
    quantize: str | None = None,
    batch_rows: int = 1,
    prefill_length: int = 64,
    capacity: int = 256,
    on_progress: Callable[[str], None] | None = None,
) -> OffloadedModel:
    """Tests and benchmarks: plan for this exact shape within `budget` bytes (None = no limit), then load_planned.
    The plan is made (and a too-small budget rejected) before any weight is read. `generate` plans for its
    prompts with plan_generation instead."""
    device = _normalized(device)
    check_quantize_name(quantize)
    config = MappedCheckpoint.read_config(path)
    if quantize:
        check_quantize_support(quantize, device, dtype)
    plan = plan_memory(config, device_type=device.type, dtype=dtype, budget=budget, quantize=quantize,
                       batch_rows=batch_rows, prefill_length=prefill_length, capacity=capacity)
    return load_planned(path, plan, device=device, on_progress=on_progress)


def _normalized(device: torch.device | str) -> torch.device:
    """A CUDA device with its index (the streams and events are per device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def describe_plan(plan: MemoryPlan) -> str:
    """One line for stderr: what stays, what streams, what it costs."""
    limit = f" of {plan.budget / GB:.3g} GB" if plan.budget is not None else ""
    return (f"memory plan ({plan.device_type}{f', {plan.quantize}' if plan.quantize else ''}): "
            f"{len(plan.resident)} blocks resident, {len(plan.streamed)} streamed "
            f"({format_blocks(plan.streamed)}) through {plan.num_slots} buffers; "
            f"{plan.charged_bytes / GB:.3g} GB{limit}")


def _to_device(t: torch.Tensor, ckpt: MappedCheckpoint, device: torch.device) -> torch.Tensor:
    """A device tensor that owns its memory (never a view of the mapped file)."""
    out = t.to(device)
    if ckpt.is_mapped(out):
        out = out.clone()
    return out.contiguous()


# ----- independent measurement (tests, benchmarks) --------------------------------------------------------------
def materialized_weight_bytes(model: nn.Module, streamer: BlockStreamer | None = None) -> int:
    """Bytes of distinct storages behind the model's parameters and buffers that are not on the meta device, plus
    the streaming buffers: what the weights occupy right now, counted from the tensors themselves."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    if streamer is not None:
        tensors += [s.flat for s in streamer.slots]
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
