"""Sharded start-up for engine fsdp: each rank materialises only its own shards.

The model is built on the meta device (no memory), sharded with FSDP2, and allocated rank by rank
(`to_empty`); then every parameter's local rows are filled, one parameter at a time:
- from a checkpoint, read lazily: a native `model.safetensors` by byte ranges (the header gives each tensor's
  offset, a row slice of a row-major tensor is one contiguous range, so a rank reads only its rows and nothing is
  memory-mapped), an original `.pt` memory-mapped through torch (only the pages of this rank's rows are touched);
  an HF checkpoint is read whole (its prompt rows and lm_head are re-laid out across tensors) and then sliced;
- for `init: new`, from the same seeded generator a single process draws from (CPMAnt.initial_value), whole
  parameter by whole parameter in the same order, keeping this rank's rows: the same bits as a single process.
A rank's peak host memory is then about its shards plus one parameter, not the whole model
(bench/startup_memory.py measures it). FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows
[r * ceil(n / N), (r + 1) * ceil(n / N)) clipped to n.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable

import torch

from cpmctl import CpmctlError
from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.checkpoint import (NATIVE_WEIGHTS, CheckpointInfo, _find_vocab, _original_files, check_state_dict,
                                     detect_format, fold_factor, read_checkpoint)
from cpmctl.model.config import CPMAntConfig
from cpmctl.train.checkpointing import keep_skeleton
from cpmctl.train.engine import fully_shard_model, local_rows

# safetensors dtype names -> torch dtypes (the format's spec, https://github.com/huggingface/safetensors)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


# ----- reading a checkpoint's rows ------------------------------------------------------------------------------
class SafetensorsRows:
    """Row slices of the tensors in one safetensors file, read by byte range (no mmap, no whole-tensor read)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CpmctlError(f"{path}: cannot read safetensors header ({type(e).__name__}: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header

    def shapes(self) -> dict[str, tuple]:
        return {k: tuple(v["shape"]) for k, v in self.entries.items()}

    def rows(self, key: str, rows: slice) -> torch.Tensor:
        entry = self.entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CpmctlError(f"{self.path}: {key} has dtype {entry['dtype']}, which cpmctl does not read")
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if not shape:  # a scalar
            rows, shape = slice(0, 1), [1]
        row_bytes = (end - begin) // max(shape[0], 1)
        out = torch.empty([rows.stop - rows.start] + shape[1:], dtype=dtype)
        if out.numel():
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin + rows.start * row_bytes)
                view = out.view(torch.uint8).reshape(-1).numpy()
                if f.readinto(view) != view.nbytes:
                    raise CpmctlError(f"{self.path}: truncated file (tensor {key})")
        return out if entry["shape"] else out.reshape(())


class StateRows:
    """Row slices of an in-memory or memory-mapped state dict. Each tensor is read once: for a memory-mapped one
    its pages are handed back after the read (madvise), so the rows a rank touched do not stay in its RSS."""

    def __init__(self, state: dict[str, torch.Tensor], mapped: bool = False):
        self.state, self.mapped = state, mapped

    def shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def rows(self, key: str, rows: slice) -> torch.Tensor:
        t = self.state[key]
        out = t[rows].clone() if t.dim() else t.clone()
        if self.mapped:
            _release_pages(t)
        return out


def _release_pages(t: torch.Tensor) -> None:
    """MADV_DONTNEED over the pages of a tensor in torch's private, read-only file mapping: they leave the RSS and
    would be read from the file again if touched (they are not). Linux only; elsewhere a no-op."""
    import ctypes
    import mmap

    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    begin = t.data_ptr() - t.data_ptr() % page + page  # whole pages inside the tensor only: neighbours untouched
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > begin:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # 4 = MADV_DONTNEED


def open_rows(path: str | Path) -> tuple[CheckpointInfo, SafetensorsRows | StateRows]:
    """A checkpoint's info and a lazy reader of its original-convention weights, checked against its config
    (keys and shapes) before any weight is read."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "native":
        root = path if path.is_dir() else path.parent
        config = CPMAntConfig.from_json(root / "config.json")
        weights = path if path.is_file() else root / NATIVE_WEIGHTS
        reader = SafetensorsRows(weights)
        vocab = _find_vocab(root)
    elif fmt == "original":
        pt, cfg = _original_files(path)
        config = CPMAntConfig.from_json(cfg)
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a legacy (non-zip) .pt cannot be memory-mapped: read it as a whole
            return _whole(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CpmctlError(f"{pt}: not a state dict of tensors")
        reader, vocab, weights = StateRows(state, mapped=True), _find_vocab(pt.parent), pt
    else:
        return _whole(path)
    check_state_dict({k: torch.empty(s, device="meta") for k, s in reader.shapes().items()}, config, str(weights))
    return CheckpointInfo(path, fmt, config, None, vocab), reader


def _whole(path: Path):
    info, state = read_checkpoint(path)
    return info, StateRows(state)


# ----- building a sharded model ---------------------------------------------------------------------------------
def _materialise(model: CPMAnt, device: torch.device, fill: Callable[[str, tuple, slice, torch.dtype], torch.Tensor],
                 prepare: Callable[[CPMAnt], None] | None) -> CPMAnt:
    """Shard the meta `model`, allocate this rank's shards on `device` and fill them parameter by parameter in the
    unsharded model's order: fill(name, full_shape, rows, dtype) -> this rank's rows of the value."""
    if prepare is not None:
        prepare(model)  # e.g. LoRA layers injected on the meta device
    keep_skeleton(model)  # the structure, to rebuild a full copy for saving (checkpointing.full_copy)
    order = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    fully_shard_model(model)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in order:
            p = params[name]
            rows = local_rows(p)
            target = p.to_local() if hasattr(p, "to_local") else p
            target.copy_(fill(name, shape, rows, target.dtype).reshape(target.shape))
    return model


def load_sharded(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                 prepare: Callable[[CPMAnt], None] | None = None,
                 extra: Callable[[str, tuple], torch.Tensor] | None = None) -> tuple[CPMAnt, CheckpointInfo]:
    """A checkpoint loaded straight into FSDP2 shards (the process group must be up). `prepare(model)` runs on the
    meta model before sharding; parameters it adds (not in the checkpoint) get `extra(name, full_shape)`."""
    info, reader = open_rows(path)
    config = info.config
    model = build_model(config, device="meta", dtype=dtype)
    stored = reader.shapes()

    def fill(name, shape, rows, target_dtype):
        key = name.replace(".base_layer.", ".")  # a linear wrapped by peft's LoRA layer holds its weight there
        if key in stored:
            value = reader.rows(key, rows)
            f = fold_factor(key, stored[key], config)
            return value.to(target_dtype) if f == 1.0 else (value.float() * f).to(target_dtype)
        if extra is None:
            raise CpmctlError(f"{path}: no weights for {name}", exit_code=1)
        return extra(name, shape)[rows].to(target_dtype)

    model = _materialise(model, device, fill, prepare)
    model.eval()
    return model, info


def init_sharded(config: CPMAntConfig, device: torch.device, seed: int, dtype: torch.dtype = torch.float32) -> CPMAnt:
    """A new model (the original's init) built straight into FSDP2 shards, the same bits as
    build_model(config, seed=seed) on one process: every rank draws each whole parameter in turn and keeps its rows."""
    model = build_model(config, device="meta", dtype=dtype)
    generator = torch.Generator().manual_seed(seed)

    def fill(name, shape, rows, target_dtype):
        return model.initial_value(name, shape, generator, target_dtype)[rows]

    return _materialise(model, device, fill, None)
