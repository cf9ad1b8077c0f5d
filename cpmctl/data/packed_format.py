"""The packed training-data format: fixed-length rows in memory-mapped binary files, and a reader whose position
can be saved and restored exactly (for resumable training) and split across distributed ranks.

A packed dataset is a directory:
  meta.json     {"format": "cpmctl-packed", "version": 1, "max_length", "num_rows", "vocab_size", "vocab_md5",
                 "records", "tokens", "target_tokens", ...}
  input.bin     int32  (rows, max_length)  unified ids: vocab ids, or vocab_size + 32 * task + j for prompt slots
  target.bin    int32  (rows, max_length)  next-token targets, -100 = no loss
  segment.bin   uint8  (rows, max_length)
  context.bin   uint8  (rows, max_length)  1 = given (bidirectional), 0 = to predict (causal)
  span.bin      int16  (rows, max_length)  records in a row have distinct spans; padding has its own span
  task.bin      int8   (rows, max_length)  objective of the token's record (1 mlm, 2 lm), -1 for padding
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpmctl import CpmctlError
from cpmctl.io import atomic_dir
from cpmctl.model.inputs import FIELDS, IGNORE

FORMAT = "cpmctl-packed"


class PackedWriter:
    """Streams rows to a temp directory; `close()` writes meta.json and renames the directory into place."""

    def __init__(self, out: str | Path, max_length: int, vocab_size: int, **meta):
        self.out = Path(out)
        self.max_length = max_length
        self.meta = {"format": FORMAT, "version": 1, "max_length": max_length, "vocab_size": vocab_size, **meta}
        self._ctx = atomic_dir(self.out)
        self.tmp = self._ctx.__enter__()
        self.files = {name: open(self.tmp / f"{name}.bin", "wb") for name in FIELDS}
        self.rows = 0
        self.target_tokens = 0

    def add_row(self, **arrays) -> None:
        for name, dtype in FIELDS.items():
            a = np.asarray(arrays[name], dtype=dtype)
            if a.shape != (self.max_length,):
                raise ValueError(f"row field {name} has shape {a.shape}, expected ({self.max_length},)")
            self.files[name].write(a.tobytes())
        self.target_tokens += int((np.asarray(arrays["target"]) != IGNORE).sum())
        self.rows += 1

    def close(self, **meta) -> Path:
        for f in self.files.values():
            f.close()
        self.meta.update(meta, num_rows=self.rows, target_tokens=self.target_tokens)
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n")
        self._ctx.__exit__(None, None, None)
        return self.out

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class PackedDataset:
    """Random access to the rows of a packed dataset (memory-mapped, nothing loaded up front)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise CpmctlError(f"{self.path}: not a packed dataset (no meta.json; create one with `cpmctl data pack`)")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CpmctlError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if self.meta.get("format") != FORMAT:
            raise CpmctlError(f"{meta_path}: format is {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.max_length = int(self.meta["max_length"])
        self.num_rows = int(self.meta["num_rows"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.arrays = {}
        for name, dtype in FIELDS.items():
            f = self.path / f"{name}.bin"
            expected = self.num_rows * self.max_length * np.dtype(dtype).itemsize
            if not f.exists() or f.stat().st_size != expected:
                raise CpmctlError(f"{f}: missing or truncated (expected {expected} bytes)")
            self.arrays[name] = (
                np.memmap(f, dtype=dtype, mode="r", shape=(self.num_rows, self.max_length))
                if self.num_rows
                else np.zeros((0, self.max_length), dtype=dtype)
            )

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, index) -> dict[str, np.ndarray]:
        return {name: np.asarray(a[index]) for name, a in self.arrays.items()}

    def check_vocab(self, vocab_size: int, what: str = "model") -> None:
        if vocab_size != self.vocab_size:
            raise CpmctlError(
                f"{self.path}: packed with a {self.vocab_size}-token vocabulary but the {what} has {vocab_size}"
            )


class RowsInMemory:
    """Rows built in memory (task examples) behind the PackedDataset interface (`len`, `rows(index)`), so the
    one PackedReader batches them."""

    def __init__(self, rows: list[dict[str, np.ndarray]], name: str = "rows"):
        if not rows:
            raise CpmctlError(f"{name}: no training rows")
        self.path = name
        self.arrays = {k: np.stack([r[k] for r in rows]) for k in FIELDS}
        self.num_rows, self.max_length = self.arrays["input"].shape

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, index) -> dict[str, np.ndarray]:
        return {k: a[index] for k, a in self.arrays.items()}


class RowRange:
    """Rows [start, stop) of a packed dataset (a held-out tail, say), with the interface PackedReader needs."""

    def __init__(self, dataset: PackedDataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop
        self.path, self.vocab_size, self.max_length = dataset.path, dataset.vocab_size, dataset.max_length

    def __len__(self) -> int:
        return self.stop - self.start

    def rows(self, index):
        return self.dataset.rows(index + self.start)

    def check_vocab(self, vocab_size: int, what: str = "model") -> None:
        self.dataset.check_vocab(vocab_size, what)


def to_batch(rows: dict[str, np.ndarray], device="cpu") -> dict[str, torch.Tensor]:
    """Model-ready tensors: long ids/targets/segments/spans/tasks, bool context."""
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(device)  # noqa: E731
    return {
        "input": t(rows["input"], torch.long),
        "target": t(rows["target"], torch.long),
        "segment": t(rows["segment"], torch.long),
        "context": t(rows["context"], torch.bool),
        "span": t(rows["span"], torch.long),
        "task": t(rows["task"], torch.long),
    }


@dataclass
class ReaderState:
    epoch: int = 0
    position: int = 0  # rows of the epoch's permutation already handed out (all ranks together)


class PackedReader:
    """Batches of rows in a seeded per-epoch shuffle. Each global step takes `batch_size * world_size` rows of the
    permutation; rank r takes its contiguous share, so ranks never overlap and the state is one integer."""

    def __init__(self, dataset: PackedDataset | RowsInMemory | RowRange, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if len(dataset) < batch_size * world_size:
            raise CpmctlError(
                f"{dataset.path}: {len(dataset)} rows is fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower the batch size or pack more data"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.state = ReaderState()
        self._order_epoch, self._order = None, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_rows(self) -> dict[str, np.ndarray]:
        step = self.batch_size * self.world_size
        if self.state.position + step > len(self.dataset):
            self.state = ReaderState(self.state.epoch + 1, 0)  # drop the ragged tail of an epoch
        order = self._permutation(self.state.epoch)
        start = self.state.position + self.rank * self.batch_size
        index = np.sort(order[start : start + self.batch_size])
        self.state.position += step
        return self.dataset.rows(index)

    def next_batch(self, device="cpu") -> dict[str, torch.Tensor]:
        return to_batch(self.next_rows(), device)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size") != self.batch_size or state.get("world_size") != self.world_size:
            raise CpmctlError(
                f"data reader state was saved with batch {state.get('batch_size')} x {state.get('world_size')} ranks, "
                f"now {self.batch_size} x {self.world_size}: resume with the same batch size and process count"
            )
        self.seed = int(state["seed"])
        self.state = ReaderState(int(state["epoch"]), int(state["position"]))
        self._order_epoch = None
