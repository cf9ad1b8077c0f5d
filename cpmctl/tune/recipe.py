"""The `cpmctl tune lora` recipe (recipes/tune/*.yaml): the task, the LoRA settings (model/lora.py), the shared
`train:` section with the defaults of LoRA tuning, the epoch / early-stopping settings and the dev decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cpmctl.model.generation_config import DecodeOverrides
from cpmctl.model.lora import LoraSettings
from cpmctl.recipe import at_least, load_recipe, non_negative
from cpmctl.tasks.registry import DEFAULT_TEMPLATE, TaskTemplate
from cpmctl.train.recipe import TrainConfig

BaseDtype = Literal["fp32", "bf16"]  # the frozen base weights' dtype (LoRA weights stay fp32)


@dataclass
class TaskSettings:
    name: str | None = None  # ccpm, c3, sogou-log, lcsts, kdconv, math23k, custom (--task)
    definition: str | None = None  # YAML task definition for custom (--task-def)
    template: TaskTemplate = DEFAULT_TEMPLATE  # built-in tasks: the original's inputs or cpmctl's (docs/tasks.md)
    max_length: int | None = None  # tokens per training row; null = the task's own
    pack: bool = False  # share rows between short examples (distinct spans)

    def check(self, at: str) -> None:
        at_least(self, at, "max_length", 48, "32 prompt slots + text")


@dataclass
class TuneSettings:
    epochs: int | None = 20  # training length in passes over the train split; null = train.steps
    patience: int = 3  # epochs without a better dev score before stopping; 0 = never stop early
    metric: str | None = None  # dev metric that picks the best adapter; null = the task's primary metric
    dev_limit: int | None = None  # score only the first N dev examples each epoch
    eval_batch_size: int = 8  # dev examples per forward pass when scoring an epoch
    base_dtype: BaseDtype = "fp32"

    def check(self, at: str) -> None:
        at_least(self, at, "epochs", 1, "or null to use train.steps")
        non_negative(self, at, "patience")
        at_least(self, at, ("dev_limit", "eval_batch_size"), 1)


@dataclass
class TuneRecipe:
    task: TaskSettings = field(default_factory=TaskSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(warmup_steps=50, save_every=200))
    tune: TuneSettings = field(default_factory=TuneSettings)
    decode: DecodeOverrides = field(default_factory=DecodeOverrides)  # dev decoding overrides (generation tasks)
    # train.engine: single, ddp, or fsdp (the frozen base sharded with the adapters; docs/distributed.md)


def load_tune_recipe(path: str | Path | None, overrides: list[str], task: str | None = None,
                     task_def: str | Path | None = None, template: str | None = None) -> TuneRecipe:
    """Defaults, then the YAML file, then --task / --task-def / --template, then the overrides."""
    return load_recipe(TuneRecipe, path, overrides,
                       flags={"task.name": task, "task.definition": task_def, "task.template": template})
