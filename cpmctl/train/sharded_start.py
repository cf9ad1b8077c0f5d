"""Sharded start-up for engine fsdp: each rank materialises only its own shards.

The model is built on the meta device (no memory), sharded with FSDP2, and allocated rank by rank
(`to_empty`); then every parameter's local rows are filled, one parameter at a time:
- from a checkpoint, read lazily: a native `model.safetensors` or an original `.pt` memory-mapped
  (model/mapped.py, as `generate --memory-limit` reads them): a rank touches only the pages of its own rows and
  hands each tensor's pages back once its rows are copied; an HF checkpoint is read whole (its prompt rows and
  lm_head are laid out across other tensors) and then sliced;
- for `init: new`, from the same seeded generator a single process draws from (CPMAnt.initial_value), whole
  parameter by whole parameter in the same order, keeping this rank's rows: the same bits as a single process.
A rank's peak host memory is then about its shards plus one parameter, not the whole model
(bench/startup_memory.py measures it). FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows
[r * ceil(n / N), (r + 1) * ceil(n / N)) clipped to n.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cpmctl import CpmctlError
from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.checkpoint import CheckpointInfo, detect_format, fold_factor, read_checkpoint
from cpmctl.model.mapped import MappedCheckpoint
from cpmctl.model.config import CPMAntConfig
from cpmctl.train.checkpointing import keep_skeleton
from cpmctl.train.engine import fully_shard_model, local_rows


# ----- reading a checkpoint ---------------------------------------------------------------------------------------
class _WholeCheckpoint:
    """An HF checkpoint, read whole (its prompt rows and lm_head are laid out across other tensors), with the
    interface of MappedCheckpoint that the sharded start uses."""

    def __init__(self, path: Path):
        self.info, self._state = read_checkpoint(path)
        self.config = self.info.config

    def keys(self) -> list[str]:
        return list(self._state)

    def raw(self, key: str) -> torch.Tensor:
        return self._state[key]

    def release(self, key: str) -> None:
        del self._state[key]  # each tensor is read once


def open_checkpoint(path: str | Path) -> MappedCheckpoint | _WholeCheckpoint:
    """A checkpoint's tensors without reading them: native and original memory-mapped (model/mapped.py; keys and
    shapes checked against the config first), HF read whole."""
    return _WholeCheckpoint(Path(path)) if detect_format(path) == "hf" else MappedCheckpoint(path)


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
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    model = build_model(config, device="meta", dtype=dtype)
    stored = set(checkpoint.keys())

    def fill(name, shape, rows, target_dtype):
        key = name.replace(".base_layer.", ".")  # a linear wrapped by peft's LoRA layer holds its weight there
        if key in stored:
            full = checkpoint.raw(key)
            f = fold_factor(key, full.shape, config)
            value = full[rows] if full.dim() else full  # only this rank's rows are read from the file
            value = value.to(target_dtype, copy=True) if f == 1.0 else (value.float() * f).to(target_dtype)
            checkpoint.release(key)  # its pages leave this process (a mapping is private and never written)
            return value
        if extra is None:
            raise CpmctlError(f"{path}: no weights for {name}", exit_code=1)
        return extra(name, shape)[rows].to(target_dtype)

    model = _materialise(model, device, fill, prepare)
    model.eval()
    return model, checkpoint.info


def init_sharded(config: CPMAntConfig, device: torch.device, seed: int, dtype: torch.dtype = torch.float32) -> CPMAnt:
    """A new model (the original's init) built straight into FSDP2 shards, the same bits as
    build_model(config, seed=seed) on one process: every rank draws each whole parameter in turn and keeps its rows."""
    model = build_model(config, device="meta", dtype=dtype)
    generator = torch.Generator().manual_seed(seed)

    def fill(name, shape, rows, target_dtype):
        return model.initial_value(name, shape, generator, target_dtype)[rows]

    return _materialise(model, device, fill, None)
