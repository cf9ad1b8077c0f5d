"""The lifecycle recipe: which stages run, on what data, with which stage recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from cpmctl.data.store import DEFAULT_THRESHOLD
from cpmctl.model.generation_config import DecodeMode
from cpmctl.resources import assets_dir

ASSETS = assets_dir()
# The stages a recipe can list, in the order they can run (their functions: lifecycle/stages.py STAGES).
Stage = Literal["filter", "dedup", "vocab", "pack", "pretrain", "prune", "tune", "eval", "generate"]


@dataclass
class DataSection:
    # Raw documents (jsonl with "text", or txt) of the first batch; default: the bundled corpus.
    input: list[str] = field(default_factory=lambda: [str(ASSETS / "corpus" / "batch1.jsonl")])
    # A later batch deduplicated against the same store (shows the store persisting across batches).
    next_batch: list[str] = field(default_factory=lambda: [str(ASSETS / "corpus" / "batch2.jsonl")])
    filter_recipe: str = "data/filter"  # a recipe file or a built-in name (`cpmctl recipes list`)
    filter_overrides: list[str] = field(default_factory=list)  # key=value overrides of the filter recipe
    dedup_threshold: float = DEFAULT_THRESHOLD  # the store's own default
    vocab_size: int = 5000  # tokens of the vocabulary built from the kept documents
    max_length: int = 256  # tokens per packed row
    valid_fraction: float = 0.05  # share of documents held out for validation
    workers: int = 2  # worker processes of the data stages


@dataclass
class PretrainSection:
    recipe: str = "pretrain/mini"  # a recipe file or a built-in name
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that recipe


@dataclass
class PruneSection:
    source: str = "mini-10b"  # ladder name of the pretrained model (prune --from)
    target: str = "mini-300m"  # ladder name to prune down to (prune --to), through every rung between
    recipe: str = "prune/mini"  # a recipe file or a built-in name
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that recipe


@dataclass
class TuneSection:
    task: str = "lcsts"  # the task tuned and evaluated (tune lora --task)
    data: str = str(ASSETS / "tasks" / "lcsts-mini")  # its data: a directory with train/dev/test.jsonl
    recipe: str = "tune/mini"  # a recipe file or a built-in name
    # Which model is tuned: "pretrained" (the mini-10b) or "pruned" (the last pruning stage).
    model: Literal["pretrained", "pruned"] = "pretrained"
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that recipe
    eval_limit: int = 60  # test examples scored by the eval stage


@dataclass
class GenerateSection:
    prompts: list[str] = field(default_factory=lambda: ["今天天气很好，", "我们学校的图书馆", "北京的冬天"])  # continued by each model
    decode: DecodeMode = "beam"  # decoding of the generate stage
    max_new_tokens: int = 40  # tokens generated per prompt
    repetition_penalty: float = 1.2  # CTRL penalty on generated tokens (the CPM-Ant README's 1.2)


@dataclass
class LifecycleRecipe:
    run_dir: str = "runs/mini"  # every stage's outputs, state.json and report.md
    seed: int = 0  # passed to every stage (train.seed, pack --seed, ...)
    stages: list[Stage] = field(default_factory=lambda: list(get_args(Stage)))  # the stages to run, in order
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    prune: PruneSection = field(default_factory=PruneSection)
    tune: TuneSection = field(default_factory=TuneSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
