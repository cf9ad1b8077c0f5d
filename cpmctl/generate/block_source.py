"""Where the blocks of a memory-limited model come from: a block's tensors folded (and quantized) out of the mapped
checkpoint in its buffer layout, the stores that hold streamed blocks between uses (CUDA: pinned host memory; CPU:
the mapped file itself; CPU with int8 / int4 linears: a scratch file quantized once), and the ledger of the bytes
the executor holds (offload.py runs them)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

from cpmctl.generate.int4 import pack_int4, quantize_int4
from cpmctl.generate.plan import LayoutEntry, layout_bytes, staging_per_weight
from cpmctl.generate.quant import quantize_weight
from cpmctl.model.mapped import MappedCheckpoint, advise

BLOCK_PREFIX = "encoder.layers"
SCRATCH_ENV = "CPMCTL_SCRATCH_DIR"


# ----- accounting ----------------------------------------------------------------------------------------------
class MemoryLedger:
    """Bytes of weights the executor holds on the device, by kind (fixed, resident, buffers, staging), with the
    peak. Thread-safe, so a store may charge from a copy thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.by_kind: dict[str, int] = {}

    def charge(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.current += nbytes
            self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
            self.peak = max(self.peak, self.current)

    def release(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.current -= nbytes
            self.by_kind[kind] -= nbytes


# ----- producing a block's tensors -----------------------------------------------------------------------------
QUANTIZED_SUFFIXES = ("_int8", "_int4")  # weight_int8 / weight_int4: one checkpoint weight, quantized
COMPANIONS = (".scale", ".scales_zeros")  # produced with their quantized weight


def _stem(name: str) -> str:
    """The checkpoint name of a layout entry: project_q.weight_int4 -> project_q.weight."""
    for suffix in QUANTIZED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def block_tensors(ckpt: MappedCheckpoint, layer: int, layout: list[LayoutEntry], dtype: torch.dtype,
                  ledger: MemoryLedger | None = None, release: bool = True, pack_device: torch.device | str = "cpu"
                  ) -> Iterator[tuple[LayoutEntry, torch.Tensor]]:
    """(entry, tensor) for every tensor of block `layer`: folded from the mapping into `dtype`, and quantized to
    int8 + scales, or int4 packed for `pack_device`'s kernel (on that device) + scales and zeros, where the layout
    asks for it (from the folded `dtype` weight, as quantize_model does).

    While a tensor is produced and consumed, its temporaries are charged to `ledger` as staging. With
    `release`, its mapped pages leave the process once consumed (loading); streaming keeps them mapped, as page
    cache the OS may reclaim, so that the next step does not fault them in again."""
    by_name = {e.name: e for e in layout}
    int4 = any(e.name.endswith(".weight_int4") for e in layout)
    for entry in layout:
        if entry.name.endswith(COMPANIONS):
            continue  # produced with its quantized weight
        stem = _stem(entry.name)
        key = f"{BLOCK_PREFIX}.{layer}.{stem}"
        staged = ckpt.raw(key).numel() * staging_per_weight("int4" if int4 else None)
        if ledger is not None:
            ledger.charge("staging", staged)
        try:
            if entry.name.endswith(".weight_int8"):
                scale_entry = by_name[stem[: -len(".weight")] + ".scale"]
                q, scale = quantize_weight(ckpt.folded(key, dtype), scale_entry.dtype)
                yield entry, q
                yield scale_entry, scale
            elif entry.name.endswith(".weight_int4"):
                codes, scales_zeros = quantize_int4(ckpt.folded(key, dtype))
                yield entry, pack_int4(codes, pack_device)
                yield by_name[stem[: -len(".weight")] + ".scales_zeros"], scales_zeros
            else:
                yield entry, ckpt.folded(key, dtype)
        finally:
            if release:
                ckpt.release(key)
            if ledger is not None:
                ledger.release("staging", staged)


def block_keys(layer: int, layout: list[LayoutEntry]) -> list[str]:
    """Checkpoint keys of a block's layout (a quantized weight and its scales come from one key)."""
    stems = [_stem(e.name) for e in layout if not e.name.endswith(COMPANIONS)]
    return [f"{BLOCK_PREFIX}.{layer}.{stem}" for stem in stems]


def buffer_views(flat: torch.Tensor, layout: list[LayoutEntry]) -> list[torch.Tensor]:
    """Typed, shaped views of a flat uint8 buffer, one per layout entry."""
    return [flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in layout]


def fill_block(ckpt: MappedCheckpoint, layer: int, layout: list[LayoutEntry], dtype: torch.dtype, flat: torch.Tensor,
               ledger: MemoryLedger | None = None, release: bool = True, pack_device: torch.device | str = "cpu"
               ) -> None:
    """Block `layer` written into the flat buffer `flat` in its layout: what block_tensors yields (same arguments),
    except that a block with no quantized weight is folded straight into the buffer, one pass per tensor and no
    temporary to allocate and fault in (fold_into: the same numbers; bench/memory.py, CPU, 7 of 8 blocks streamed:
    5.7-13.4 -> 16.9-17.1 tok/s; docs/memory.md)."""
    views = buffer_views(flat, layout)
    if any(e.name.endswith(QUANTIZED_SUFFIXES) for e in layout):
        for (entry, t), view in zip(block_tensors(ckpt, layer, layout, dtype, ledger, release, pack_device), views):
            view.copy_(t)
        return
    for entry, view in zip(layout, views):
        key = f"{BLOCK_PREFIX}.{layer}.{entry.name}"
        raw = ckpt.raw(key)
        staged = 0 if raw.dtype == torch.float32 else raw.numel() * 4  # the fp32 copy of an fp16 tensor
        if ledger is not None:
            ledger.charge("staging", staged)
        try:
            ckpt.fold_into(key, view)
        finally:
            if release:
                ckpt.release(key)
            if ledger is not None:
                ledger.release("staging", staged)


# ----- where streamed blocks come from -------------------------------------------------------------------------
class PinnedHostStore:
    """CUDA: each streamed block packed once, in its buffer layout, in pinned host memory (the one host copy of
    these weights); a transfer is one asynchronous copy of the block's bytes."""

    def __init__(self, ckpt: MappedCheckpoint, layers: list[int], layouts: dict, dtype: torch.dtype,
                 device: torch.device):
        self.packed: dict[int, torch.Tensor] = {}
        for layer in layers:
            flat = torch.empty(layout_bytes(layouts[layer]), dtype=torch.uint8, pin_memory=True)
            # int4 packs in the GPU's layout, on the GPU (one weight at a time), then comes back to the host copy.
            fill_block(ckpt, layer, layouts[layer], dtype, flat, pack_device=device)
            self.packed[layer] = flat

    def fill(self, layer: int, slot: torch.Tensor) -> None:
        src = self.packed[layer]
        slot[: src.numel()].copy_(src, non_blocking=True)


class MappedStore:
    """CPU device: a streamed block is folded (and quantized) straight out of the memory-mapped checkpoint into
    its buffer when it runs; its weights are otherwise never in memory. Prefetching asks the OS to read the
    block's pages ahead (MADV_WILLNEED), so disk reads overlap compute without a second thread competing for the
    cores."""

    def __init__(self, ckpt: MappedCheckpoint, layouts: dict, dtype: torch.dtype, ledger: MemoryLedger):
        self.ckpt, self.layouts, self.dtype, self.ledger = ckpt, layouts, dtype, ledger

    def prefetch(self, layer: int) -> None:
        for key in block_keys(layer, self.layouts[layer]):
            self.ckpt.prefetch(key)

    def fill(self, layer: int, slot: torch.Tensor) -> None:
        fill_block(self.ckpt, layer, self.layouts[layer], self.dtype, slot, self.ledger, release=False)


def scratch_dir() -> Path:
    """Where ScratchStore writes: $CPMCTL_SCRATCH_DIR, else the user's cache directory (on disk: /tmp is memory on
    many hosts, and a scratch file in memory would hold the very bytes the limit keeps out of it)."""
    if os.environ.get(SCRATCH_ENV):
        return Path(os.environ[SCRATCH_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpmctl"


class ScratchStore:
    """CPU device with int8 / int4 linears: every streamed block is folded and quantized once, at load, in its
    buffer layout, into a scratch file that is then mapped; a use is one copy of the block's bytes, where
    MappedStore would fold and quantize it again for every token (docs/memory.md). The file is unlinked as soon as
    it is created, so nothing stays on disk however the process ends; its pages are page cache, as the
    checkpoint's are. Each block starts on a page, so prefetching one advises only its own pages."""

    def __init__(self, ckpt: MappedCheckpoint, layers: list[int], layouts: dict, dtype: torch.dtype,
                 ledger: MemoryLedger, directory: Path):
        sizes = {layer: layout_bytes(layouts[layer]) for layer in layers}
        self.regions: dict[int, tuple[int, int]] = {}
        end = 0
        for layer in layers:
            self.regions[layer] = (end, sizes[layer])
            end += -(-sizes[layer] // mmap.PAGESIZE) * mmap.PAGESIZE
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free < end:  # found before any block is quantized, not after a full disk stops the writes
            raise OSError(errno.ENOSPC, f"{end / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")
        with tempfile.TemporaryFile(dir=directory, prefix="cpmctl-stream-") as f:
            os.ftruncate(f.fileno(), end)
            staging = torch.empty(max(sizes.values()), dtype=torch.uint8)  # one block at a time
            ledger.charge("staging", staging.numel())
            try:
                for layer in layers:
                    start, size = self.regions[layer]
                    flat = staging[:size]
                    fill_block(ckpt, layer, layouts[layer], dtype, flat, ledger)
                    data = memoryview(flat.numpy())
                    while data:  # a full disk raises OSError here, before anything is mapped
                        written = os.pwrite(f.fileno(), data, start)
                        data, start = data[written:], start + written
            finally:
                ledger.release("staging", staging.numel())
            self.map = mmap.mmap(f.fileno(), end, access=mmap.ACCESS_COPY)  # the mapping outlives the descriptor
        self.flat = torch.frombuffer(self.map, dtype=torch.uint8)

    def _region(self, layer: int) -> torch.Tensor:
        start, size = self.regions[layer]
        return self.flat[start : start + size]

    def prefetch(self, layer: int) -> None:
        advise(self._region(layer), getattr(mmap, "MADV_WILLNEED", 3))

    def fill(self, layer: int, slot: torch.Tensor) -> None:
        src = self._region(layer)
        slot[: src.numel()].copy_(src)
