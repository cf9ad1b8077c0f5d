"""The lifecycle recipe: which stages run, on what data, with which stage recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from cpmctl import REPO_ROOT
from cpmctl.data.store import DEFAULT_THRESHOLD
from cpmctl.model.generation_config import DecodeMode

ASSETS = REPO_ROOT / "cpmctl" / "assets"
# The stages a recipe can list, in the order they can run (their functions: lifecycle/stages.py STAGES).
Stage = Literal["filter", "dedup", "vocab", "pack", "pretrain", "prune", "tune", "eval", "generate"]


@dataclass
class DataSection:
    input: list[str] = field(default_factory=lambda: [str(ASSETS / "corpus" / "batch1.jsonl")])
    # A later batch deduplicated against the same store (shows the store persisting across batches).
    next_batch: list[str] = field(default_factory=lambda: [str(ASSETS / "corpus" / "batch2.jsonl")])
    filter_recipe: str = str(REPO_ROOT / "recipes" / "data" / "filter.yaml")
    filter_overrides: list[str] = field(default_factory=list)
    dedup_threshold: float = DEFAULT_THRESHOLD  # the store's own default
    vocab_size: int = 5000
    max_length: int = 256
    valid_fraction: float = 0.05
    workers: int = 2


@dataclass
class PretrainSection:
    recipe: str = str(REPO_ROOT / "recipes" / "pretrain" / "mini.yaml")
    overrides: list[str] = field(default_factory=list)


@dataclass
class PruneSection:
    source: str = "mini-10b"
    target: str = "mini-300m"
    recipe: str = str(REPO_ROOT / "recipes" / "prune" / "mini.yaml")
    overrides: list[str] = field(default_factory=list)


@dataclass
class TuneSection:
    task: str = "lcsts"
    data: str = str(ASSETS / "tasks" / "lcsts-mini")
    recipe: str = str(REPO_ROOT / "recipes" / "tune" / "mini.yaml")
    # Which model is tuned: "pretrained" (the mini-10b) or "pruned" (the last pruning stage).
    model: Literal["pretrained", "pruned"] = "pretrained"
    overrides: list[str] = field(default_factory=list)
    eval_limit: int = 60


@dataclass
class GenerateSection:
    prompts: list[str] = field(default_factory=lambda: ["今天天气很好，", "我们学校的图书馆", "北京的冬天"])
    decode: DecodeMode = "beam"
    max_new_tokens: int = 40
    repetition_penalty: float = 1.2


@dataclass
class LifecycleRecipe:
    run_dir: str = "runs/mini"
    seed: int = 0
    stages: list[Stage] = field(default_factory=lambda: list(get_args(Stage)))
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    prune: PruneSection = field(default_factory=PruneSection)
    tune: TuneSection = field(default_factory=TuneSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
