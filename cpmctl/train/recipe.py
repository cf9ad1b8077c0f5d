"""The training recipes: TrainConfig (the `train:` section every training stage shares: pretraining, pruning's
`mask:` and `recovery:`, LoRA tuning) and the pretrain recipe around it.

Choices are `Literal` types, so the loader rejects a bad one with its key path before any model is loaded; the
`check(at)` hooks hold the rules a type cannot state (cpmctl/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cpmctl.model.flex_attention import ATTENTION_KINDS
from cpmctl.recipe import fail, load_recipe, non_negative, positive, within
from cpmctl.train.engine import ENGINES, PRECISIONS
from cpmctl.train.metrics import LOGGERS
from cpmctl.train.schedule import SCHEDULES

Schedule = Literal[SCHEDULES]  # noam | cosine | linear | constant (train/schedule.py)
EngineKind = Literal[ENGINES]  # single | ddp | fsdp (torch.distributed, launched by torchrun)
Precision = Literal[PRECISIONS]  # fp32 | bf16 (autocast, CPU and GPU) | fp16 (GPU, dynamic loss scale from 2**20)
CheckpointFormat = Literal["full", "sharded"]  # sharded: fsdp's torch.distributed.checkpoint shards, no gathering
DecayOn = Literal["matrices", "all"]  # matrices: 2-D weights only; all: every parameter, as the original's one group
Logger = Literal[LOGGERS]  # jsonl | tensorboard (OUT/tensorboard/) | wandb (offline unless WANDB_MODE says otherwise)
Attention = Literal[ATTENTION_KINDS]  # sdpa | flex (FlexAttention score_mod + BlockMask, model/flex_attention.py)


@dataclass
class TrainConfig:
    """Flat training settings; a recipe section `train:` maps onto it. `lr` is the peak learning rate."""

    steps: int = 1000  # optimizer updates in the run
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer update (rows per update = batch_size x grad_accum x processes)
    lr: float = 1e-3  # the peak learning rate (the schedule scales it)
    schedule: Schedule = "noam"
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = 0.0  # cosine / linear: the lr they decay to, as a share of lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    weight_decay_on: DecayOn = "matrices"  # docs/pretrain.md: why not the original's "all", and the measured effect
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    precision: Precision = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, slower
    compile: bool = False  # torch.compile the model's blocks
    attention: Attention = "sdpa"  # the attention kernel of training forwards; flex: for GPU throughput
    engine: EngineKind = "single"
    log_every: int = 10  # steps per metrics.jsonl row (the means over those steps)
    valid_every: int = 100  # steps between validation passes (needs validation data)
    valid_batches: int = 20  # batches per validation pass; 0 = no validation
    save_every: int = 500  # steps between checkpoints (one is also written at the end)
    keep_last: int = 2  # 0 = keep every checkpoint
    seed: int = 0  # data order, dropout and every other random draw of the run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_format: CheckpointFormat = "full"
    # AdamW on folded weights with the steps AdamW takes on the original-convention weights (docs/pretrain.md).
    original_lr_scaling: bool = True
    # Where every metrics.jsonl row also goes; tensorboard and wandb need their pip extra (cpmctl[tensorboard]).
    logger: Logger = "jsonl"

    def check(self, at: str) -> None:
        positive(self, at, "steps", "batch_size", "grad_accum", "log_every", "valid_every", "save_every")
        non_negative(self, at, "lr", "warmup_steps", "weight_decay", "grad_clip", "valid_batches", "keep_last")
        within(self, at, "min_lr_ratio", 0.0, 1.0)
        if self.checkpoint_format == "sharded" and self.engine != "fsdp":
            fail(at, "checkpoint_format", f"sharded checkpoints need {at}.engine=fsdp")


# ----- pretrain ------------------------------------------------------------------------------------------------
@dataclass
class PretrainModel:
    init: str = "mini-10b"  # ladder name / config JSON (a new model), or a checkpoint to continue training
    vocab: str | None = None  # vocabulary file; default: vocab.txt beside the checkpoint
    seed: int = 0  # initialisation seed of a new model


@dataclass
class PretrainData:
    train: str = ""  # packed dataset directory (`cpmctl data pack`)
    valid: str | None = None  # held-out packed dataset for validation loss

    def check(self, at: str) -> None:
        if not self.train:
            fail(at, "train", "the packed training data directory is required (`cpmctl data pack`)")


@dataclass
class PretrainRecipe:
    model: PretrainModel = field(default_factory=PretrainModel)
    data: PretrainData = field(default_factory=PretrainData)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/pretrain"  # the run directory: checkpoints, metrics.jsonl, final/
    resume: bool | str = False  # true: continue out_dir's latest checkpoint; a path: that run or checkpoint


def load_pretrain_recipe(path: str | Path | None, overrides: list[str] | None = None) -> PretrainRecipe:
    return load_recipe(PretrainRecipe, path, overrides)
