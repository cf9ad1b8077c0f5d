"""The prune recipe: the mask phase and recovery (two sections of the shared TrainConfig, with the defaults a prune
run starts from), the gates, distillation and data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cpmctl.recipe import fail, load_recipe, non_negative, positive, within
from cpmctl.train.recipe import TrainConfig

Method = Literal["learned", "activation", "magnitude", "random"]  # hard-concrete masks | the baselines (no mask phase)
GateInit = Literal["constant", "activation"]  # log_alpha start: N(init_mean, init_std) | ranked activation importance
LayerSearch = Literal["drop-one", "greedy"]  # sub-blocks scored each alone | removed one at a time, re-scored
WidthSearch = Literal["joint", "separate"]  # heads searched under the stage's channel cut | on the whole FFN
ChannelScore = Literal["activation", "output"]  # mean |h_j| | mean |h_j| x ||w_out[:, j]||: what channel j writes
Score = Literal["norm", "loss", "kl"]  # mean activation norm | calibration loss increase when the structure alone is
# dropped | KL(full || without it) of the next-token distributions (the same searches)


@dataclass
class GateConfig:
    init_mean: float = 3.0  # log_alpha ~ N(init_mean, init_std); the original's 10 saturates z at 1 (no gradient)
    init_std: float = 0.01  # spread of the initial log_alpha
    init: GateInit = "constant"  # activation: init_mean + init_spread * (centred rank of the importance, in [-1, 1])
    init_spread: float = 2.0  # half-width of the importance-ranked start (init: activation)
    lr: float = 0.1  # log_alpha learning rate (constant; the original 0.1, Sheared-LLaMA 1.0)
    lambda_lr: float = 0.1  # Lagrange multipliers, gradient ascent
    target_warmup: float = 0.2  # fraction of the mask phase over which the target goes from 1 to the final size
    log_alpha_limit: float = 10.0  # log_alpha kept within +-limit: bounds how far a gate can run away
    beta1: float = 0.0  # AdamW momentum of gates and multipliers: with momentum they sail past the target
    train_weights: bool = True  # false: the mask phase moves only the gates (and multipliers); weights stay frozen

    def check(self, at: str) -> None:
        within(self, at, "target_warmup", 0.0, 1.0)
        positive(self, at, "log_alpha_limit", "lr", "lambda_lr")
        non_negative(self, at, "init_spread")


@dataclass
class DistillConfig:
    weight: float = 0.0  # 0 = off; loss = (1 - weight) * CE + weight * T^2 * KL(teacher || student)
    temperature: float = 2.0  # T of the distillation softmax
    recovery: bool = False  # also distil recovery from the stage's unpruned model (every method alike)

    def check(self, at: str) -> None:
        within(self, at, "weight", 0.0, 1.0)
        positive(self, at, "temperature")
        if self.recovery and self.weight == 0:  # would distil nothing: say so instead of a silent no-op
            fail(at, "recovery", "needs distill.weight > 0")


@dataclass
class PruneData:
    train: str = ""  # packed training data (`cpmctl data pack`); --data sets it
    valid: str | None = None  # packed validation data; default: the last valid_rows rows of train, held out
    valid_rows: int = 64  # rows of train held out when data.valid is null
    eval_batches: int = 8  # validation batches behind each loss in the report
    calibration_batches: int = 8  # activation importance: seeded batches of training rows (recovery.batch_size)

    def check(self, at: str) -> None:
        positive(self, at, "eval_batches", "calibration_batches")
        non_negative(self, at, "valid_rows")


@dataclass
class ImportanceConfig:
    """How `method: activation` scores structures (importance.py; bench/prune.py measured loss over norm)."""
    layers: Score = "loss"  # attention / FFN sub-blocks: drop-one loss increase (a forward per sub-block) | output norm
    heads: Score = "loss"  # heads: greedy search on the calibration loss | output norm summed over layers (Minitron)
    channels: ChannelScore = "activation"  # FFN channels: mean |activation| | the mean norm of the channel's output
    layer_search: LayerSearch = "drop-one"  # layers loss / kl: each sub-block alone | greedy removal, re-scored
    # heads loss / kl at a width stage: the head search with the stage's channel cut in place | on the whole FFN
    width_search: WidthSearch = "joint"

    def check(self, at: str) -> None:
        if self.layer_search == "greedy" and self.layers == "norm":
            fail(at, "layer_search", "greedy searches by loss or kl; importance.layers is norm")


def _mask_defaults() -> TrainConfig:
    return TrainConfig(steps=200, schedule="constant", warmup_steps=0, save_every=100, valid_every=10**9)


def _recovery_defaults() -> TrainConfig:
    return TrainConfig(steps=200, schedule="cosine", warmup_steps=20, save_every=100)


@dataclass
class PruneRecipe:
    method: Method = "activation"
    mask: TrainConfig = field(default_factory=_mask_defaults)  # the mask phase
    gates: GateConfig = field(default_factory=GateConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)  # method: activation
    distill: DistillConfig = field(default_factory=DistillConfig)
    recovery: TrainConfig = field(default_factory=_recovery_defaults)  # recovery training after extraction
    data: PruneData = field(default_factory=PruneData)
    seed: int = 0  # gate noise and random selection
    # mask.engine / recovery.engine: single, or ddp / fsdp under torchrun (`cpmctl prune --nproc N`; docs/distributed.md)

    def check(self, at: str) -> None:
        if self.method == "learned" and not self.gates.train_weights and self.mask.engine != "single":
            fail(at, "gates.train_weights", f"false runs the mask phase in one process; mask.engine is {self.mask.engine}")


def load_prune_recipe(path: str | Path | None, overrides: list[str] | None = None) -> PruneRecipe:
    return load_recipe(PruneRecipe, path, overrides)
