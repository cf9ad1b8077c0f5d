"""The prune recipe: the mask phase and recovery (two sections of the shared TrainConfig), the gates, distillation
and data, with the defaults a prune run starts from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.recipe import load_recipe
from cpmctl.train.loop import TrainConfig

METHODS = ("learned", "random", "magnitude")


@dataclass
class GateConfig:
    init_mean: float = 3.0  # log_alpha ~ N(init_mean, init_std); the original's 10 saturates z at 1 (no gradient)
    init_std: float = 0.01
    lr: float = 0.1  # log_alpha learning rate (constant; the original 0.1, Sheared-LLaMA 1.0)
    lambda_lr: float = 0.1  # Lagrange multipliers, gradient ascent
    target_warmup: float = 0.2  # fraction of the mask phase over which the target goes from 1 to the final size
    log_alpha_limit: float = 10.0  # log_alpha kept within +-limit: bounds how far a gate can run away
    beta1: float = 0.0  # AdamW momentum of gates and multipliers: with momentum they sail past the target


@dataclass
class DistillConfig:
    weight: float = 0.0  # 0 = off; loss = (1 - weight) * CE + weight * T^2 * KL(teacher || student)
    temperature: float = 2.0


@dataclass
class PruneData:
    train: str = ""  # packed training data (`cpmctl data pack`); --data sets it
    valid: str | None = None  # packed validation data; default: the last valid_rows rows of train, held out
    valid_rows: int = 64
    eval_batches: int = 8  # validation batches behind each loss in the report


@dataclass
class PruneRecipe:
    method: str = "learned"  # learned (hard-concrete masks) | random | magnitude (baselines: no mask phase)
    mask: TrainConfig = field(default_factory=TrainConfig)  # the mask phase
    gates: GateConfig = field(default_factory=GateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    recovery: TrainConfig = field(default_factory=TrainConfig)  # recovery training after extraction
    data: PruneData = field(default_factory=PruneData)
    seed: int = 0  # gate noise and random selection


# Defaults a prune recipe starts from (TrainConfig's own defaults are for pretraining).
RECIPE_BASE = {
    "mask": {"steps": 200, "lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "save_every": 100,
             "valid_every": 10**9, "log_every": 10},
    "recovery": {"steps": 200, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 20, "save_every": 100,
                 "valid_every": 100, "log_every": 10},
}


def load_prune_recipe(path: str | Path | None, overrides: list[str] | None = None) -> PruneRecipe:
    recipe = load_recipe(PruneRecipe, path, overrides, base=copy.deepcopy(RECIPE_BASE))
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: PruneRecipe) -> None:
    if recipe.method not in METHODS:
        raise CpmctlError(f"method: expected one of {', '.join(METHODS)}, got {recipe.method!r}")
    for name in ("mask", "recovery"):
        cfg: TrainConfig = getattr(recipe, name)
        try:
            cfg.validate()
        except CpmctlError as e:
            raise CpmctlError(str(e).replace("train.", f"{name}.", 1)) from None
        if cfg.engine != "single":
            raise CpmctlError(f"{name}.engine: pruning runs in one process (engine single), got {cfg.engine!r}")
    if not 0.0 <= recipe.distill.weight <= 1.0:
        raise CpmctlError(f"distill.weight: must be within [0, 1], got {recipe.distill.weight}")
    if recipe.distill.temperature <= 0:
        raise CpmctlError(f"distill.temperature: must be positive, got {recipe.distill.temperature}")
    if not 0.0 <= recipe.gates.target_warmup <= 1.0:
        raise CpmctlError(f"gates.target_warmup: must be within [0, 1], got {recipe.gates.target_warmup}")
    if recipe.gates.log_alpha_limit <= 0:
        raise CpmctlError(f"gates.log_alpha_limit: must be positive, got {recipe.gates.log_alpha_limit}")
    if recipe.gates.lr <= 0 or recipe.gates.lambda_lr <= 0:
        raise CpmctlError("gates.lr and gates.lambda_lr must be positive")
    if recipe.data.eval_batches <= 0 or recipe.data.valid_rows < 0:
        raise CpmctlError("data.eval_batches must be positive and data.valid_rows not negative")
