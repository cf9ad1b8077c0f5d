"""The rows a prune stage trains, calibrates and validates on: the packed data checked against the model's
vocabulary, the held-out validation rows, each rank's readers, and the fixed-rows validation loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader, RowRange
from cpmctl.model.ant import CPMAnt
from cpmctl.prune.mask_phase import lm_objective
from cpmctl.prune.recipe import PruneData
from cpmctl.train.engine import Engine
from cpmctl.train.loop import TrainConfig, evaluate


@dataclass
class StageData:
    train: PackedDataset | RowRange
    valid: PackedDataset | RowRange


def open_data(section: PruneData, vocab_size: int, batch_sizes: list[int]) -> StageData:
    """Training rows and validation rows, checked against the model's vocabulary before any work."""
    if not section.train:
        raise CpmctlError("--data: the packed training data directory is required (`cpmctl data pack`)")
    train_set = PackedDataset(section.train)
    train_set.check_vocab(vocab_size, "model (--data)")
    if section.valid:
        valid_set = PackedDataset(section.valid)
        valid_set.check_vocab(vocab_size, "model (data.valid)")
        train_rows: PackedDataset | RowRange = train_set
    else:
        n = section.valid_rows
        if n <= 0 or n >= len(train_set):
            raise CpmctlError(f"{train_set.path}: {len(train_set)} rows cannot hold out data.valid_rows={n} rows "
                              "for validation; pass --valid or change data.valid_rows")
        train_rows = RowRange(train_set, 0, len(train_set) - n)
        valid_set = RowRange(train_set, len(train_set) - n, len(train_set))
    need = max(batch_sizes)
    if len(train_rows) < need:
        raise CpmctlError(f"{train_set.path}: {len(train_rows)} training rows is fewer than one batch ({need})")
    if len(valid_set) < 1:
        raise CpmctlError(f"{section.valid}: no validation rows")
    return StageData(train_rows, valid_set)


def validation_loss(model: CPMAnt, valid_rows, batch_size: int, batches: int) -> float:
    """Token-weighted LM loss over the first `batches` batches of the validation rows (always the same rows)."""
    device = model.input_embedding.weight.device
    reader = PackedReader(valid_rows, min(batch_size, len(valid_rows)), shuffle=False)
    batches = max(1, min(batches, len(valid_rows) // reader.batch_size))
    row = evaluate(model, reader, lm_objective, batches, Engine("single", device), contextlib.nullcontext)
    return float(row["valid_loss"])


def train_reader(rows, cfg: TrainConfig, engine: Engine | None) -> PackedReader:
    """This rank's share of each global batch (the whole batch in one process)."""
    rank, world = (engine.rank, engine.world_size) if engine is not None else (0, 1)
    return PackedReader(rows, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)


def valid_reader(rows, cfg: TrainConfig, engine: Engine | None):
    if cfg.valid_batches <= 0:
        return None
    rank, world = (engine.rank, engine.world_size) if engine is not None else (0, 1)
    return PackedReader(rows, min(cfg.batch_size, len(rows) // world), shuffle=False, rank=rank, world_size=world)
