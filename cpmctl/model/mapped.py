"""A checkpoint read lazily: tensors are views of a memory-mapped file, read from disk when used, folded one at a
time. Host memory never holds a second full copy of the weights.

Native checkpoints: model.safetensors is mapped and its tensors are `torch.frombuffer` views of the mapping (the
safetensors layout: an 8-byte little-endian header length, a JSON header of name -> dtype, shape, data offsets,
then the data). Original checkpoints: `torch.load(mmap=True)` gives the same kind of views of the .pt file.
The HF layout (folded, prefixed, prompt rows inside the embedding) is not read lazily: convert it to native first.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
from pathlib import Path

import torch

from cpmctl import CpmctlError
from cpmctl.model.checkpoint import (
    NATIVE_WEIGHTS,
    vocab_beside,
    CheckpointInfo,
    _original_files,
    check_state_dict,
    detect_format,
    fold,
    fold_factor,
    read_config,
)
from cpmctl.model.config import CPMAntConfig

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _load_madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


_MADVISE = _load_madvise()


def advise(t: torch.Tensor, advice: int) -> None:
    """madvise the pages under a mapped tensor: MADV_WILLNEED starts reading them from disk in the background,
    MADV_DONTNEED drops them from this process (the mapping is private and never written, so a later access
    simply reads the file again). Pages shared with a neighbouring tensor are included: harmless for both."""
    if _MADVISE is None or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    _MADVISE(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(advice))


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor viewing a private (copy-on-write, never written) mapping of the file."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise CpmctlError(f"checkpoint not found: {path}") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError) as e:
        raise CpmctlError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CpmctlError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or start + end > len(mapped):
            raise CpmctlError(f"{path}: tensor {name} has inconsistent offsets (damaged file?)")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return tensors


def _map_original(pt: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged or legacy file
        raise CpmctlError(
            f"{pt}: cannot memory-map this checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "convert it with `cpmctl model convert --to native`"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CpmctlError(f"{pt}: not a state dict of tensors")
    return state


class MappedCheckpoint:
    """Original-convention tensors of a native or original checkpoint, memory-mapped; `folded` gives one tensor in
    the in-memory (folded) convention, computed exactly as `checkpoint.load_model` computes it."""

    def __init__(self, path: str | Path):
        path = Path(path)
        fmt = detect_format(path)
        if fmt == "native":
            root = path if path.is_dir() else path.parent
            config = CPMAntConfig.from_json(root / "config.json")
            weights = path if path.is_file() else root / NATIVE_WEIGHTS
            self._tensors = _map_safetensors(weights)
            source = weights
        elif fmt == "original":
            pt, cfg = _original_files(path)
            config = CPMAntConfig.from_json(cfg)
            self._tensors = _map_original(pt)
            source = pt
        else:
            raise CpmctlError(
                f"{path}: HF-layout checkpoints are not read lazily; convert with `cpmctl model convert --to native`"
            )
        check_state_dict(self._tensors, config, str(source))
        self._mapped_ptrs = {t.data_ptr() for t in self._tensors.values() if t.numel()}
        dtypes = {t.dtype for t in self._tensors.values()}
        self.config = config
        self.info = CheckpointInfo(path, fmt, config, dtypes.pop() if len(dtypes) == 1 else None, vocab_beside(source))

    @staticmethod
    def read_config(path: str | Path) -> CPMAntConfig:
        """The config of a checkpoint this class can map, without mapping it."""
        fmt = detect_format(path)
        if fmt == "hf":
            raise CpmctlError(
                f"{path}: HF-layout checkpoints are not read lazily; convert with `cpmctl model convert --to native`"
            )
        return read_config(path)[0]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def raw(self, key: str) -> torch.Tensor:
        """The original-convention tensor (a view of the mapping)."""
        return self._tensors[key]

    def is_mapped(self, t: torch.Tensor) -> bool:
        """Whether `t` is (a view starting at) a tensor of the mapping rather than memory of its own."""
        return t.device.type == "cpu" and t.numel() > 0 and t.data_ptr() in self._mapped_ptrs

    def prefetch(self, key: str) -> None:
        """Ask the OS to start reading this tensor from disk (returns at once)."""
        advise(self._tensors[key], getattr(mmap, "MADV_WILLNEED", 3))

    def release(self, key: str) -> None:
        """Drop this tensor's pages from the process once it has been folded into memory of its own."""
        advise(self._tensors[key], getattr(mmap, "MADV_DONTNEED", 4))

    def folded(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        return fold({key: self._tensors[key]}, self.config, dtype=dtype)[key]

    def fold_into(self, key: str, out: torch.Tensor) -> None:
        """folded(key, out.dtype) written straight into `out`: the same numbers (the fp32 product, then the cast) in
        one pass over the mapping, with no temporary for an fp32 tensor (one fp32 copy for an fp16 one)."""
        t = self._tensors[key]
        f = fold_factor(key, t.shape, self.config)
        if f == 1.0:
            out.copy_(t)
        else:
            torch.mul(t.float(), f, out=out)
