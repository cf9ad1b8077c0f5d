"""The `cpmctl eval` recipe (recipes/eval/*.yaml): batch and split settings, and the task's decoding overrides.
`--split`, `--batch-size`, `--limit`, `--device`, `--dtype` and the decoding flags are overrides of these keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cpmctl.device import DTYPE_NAMES
from cpmctl.model.generation_config import DecodeOverrides, overrides_of
from cpmctl.recipe import at_least
from cpmctl.tasks.registry import DEFAULT_TEMPLATE, TaskTemplate
from cpmctl.tasks.schema import SPLITS

Split = Literal[SPLITS]  # train | dev | test
Dtype = Literal[DTYPE_NAMES]  # fp32 | bf16 | fp16 (GPU)


@dataclass
class EvalSettings:
    split: Split = "test"  # used when --data is a task directory
    template: TaskTemplate = DEFAULT_TEMPLATE  # built-in tasks: the original's inputs or cpmctl's (docs/tasks.md)
    batch_size: int = 8  # examples (choice tasks: options) per forward pass
    limit: int | None = None  # score only the first N examples
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Dtype = "fp32"

    def check(self, at: str) -> None:
        at_least(self, at, ("batch_size", "limit"), 1)


@dataclass
class EvalRecipe:
    eval: EvalSettings = field(default_factory=EvalSettings)
    decode: DecodeOverrides = field(default_factory=DecodeOverrides)

    def decode_overrides(self) -> dict:
        return overrides_of(self.decode)
