"""Pruning targets: a ladder stage (or a config file) -> the exact shape a stage must reach, the list of stages from
`--from` to `--to`, and the reachability checks that run before any weights are loaded.

A *shape* is what pruning can change: how many attention and FFN sub-blocks are kept, the number of heads and
dim_ff. Which layers are kept is decided by the learned masks, not by the ladder config: the ladder's
`mask_modules` only says how many. dim_model, dim_head and the layer indexing (num_layers) never change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.model.ant import param_counts
from cpmctl.model.config import LADDER, MINI_LADDER, CPMAntConfig, canonical_name, resolve_config

# Structure types a stage can prune, in a fixed order (the Lagrangian keeps one multiplier pair per type).
KINDS = ("attention", "ffn", "heads", "channels")


@dataclass(frozen=True)
class Shape:
    attention_kept: int
    ffn_kept: int
    num_heads: int
    dim_ff: int

    @classmethod
    def of(cls, config: CPMAntConfig) -> "Shape":
        return cls(config.num_attention_kept, config.num_ffn_kept, config.num_heads, config.dim_ff)

    def counts(self) -> dict[str, int]:
        """How many structures of each type the shape keeps (heads / channels: per layer), keyed by KINDS."""
        return dict(zip(KINDS, (self.attention_kept, self.ffn_kept, self.num_heads, self.dim_ff)))

    def describe(self) -> str:
        return (f"attention {self.attention_kept}, ffn {self.ffn_kept}, heads {self.num_heads}, "
                f"dim_ff {self.dim_ff}")


@dataclass(frozen=True)
class Stage:
    """One rung down the ladder. Its target shape and the structure types it shrinks are computed once, when the
    stage is planned; the mask phase, the baselines, extraction's check and the report all read them from here."""

    index: int  # 1-based
    source_name: str
    target_name: str
    source: CPMAntConfig  # the ladder (or file) config the stage starts from
    target: CPMAntConfig  # the ladder (or file) config whose counts the stage must reach
    target_shape: Shape
    kinds: list[str]  # the structure types this stage shrinks, in KINDS order

    @classmethod
    def plan(cls, index: int, source_name: str, target_name: str, source: CPMAntConfig,
             target: CPMAntConfig) -> "Stage":
        s, t = Shape.of(source).counts(), Shape.of(target)
        kinds = [k for k, n in t.counts().items() if n < s[k]]
        return cls(index, source_name, target_name, source, target, t, kinds)

    @property
    def dirname(self) -> str:
        return f"stage-{self.index}-{_slug(self.source_name)}-to-{_slug(self.target_name)}"

    def target_counts(self) -> dict[str, int]:
        return self.target_shape.counts()


def _slug(name: str) -> str:
    return Path(name).stem if (name.endswith(".json") or "/" in name) else name


def _ladder_of(name: str) -> list[str] | None:
    for ladder in (LADDER, MINI_LADDER):
        if name in ladder:
            return ladder
    return None


def check_reachable(source: CPMAntConfig, target: CPMAntConfig, source_name: str, target_name: str) -> None:
    """One-line errors for a target pruning cannot produce from the source."""
    where = f"--to {target_name} from --from {source_name}"
    if target.dim_model != source.dim_model:
        raise CpmctlError(f"{where} changes dim_model {source.dim_model} -> {target.dim_model}; "
                          "pruning keeps dim_model (only layers, heads and dim_ff shrink)")
    if target.dim_head != source.dim_head:
        raise CpmctlError(f"{where} changes dim_head {source.dim_head} -> {target.dim_head}; pruning keeps dim_head")
    s, t = Shape.of(source), Shape.of(target)
    grown = [
        f"{what} {a} -> {b}"
        for what, a, b in (
            ("attention layers", s.attention_kept, t.attention_kept),
            ("ffn layers", s.ffn_kept, t.ffn_kept),
            ("num_heads", s.num_heads, t.num_heads),
            ("dim_ff", s.dim_ff, t.dim_ff),
        )
        if b > a
    ]
    if grown:
        raise CpmctlError(f"{where} is not reachable: pruning cannot grow {', '.join(grown)}")
    if s == t:
        raise CpmctlError(f"{where}: the target has the same shape as the source ({s.describe()}); nothing to prune")
    for what, n in (("attention layers", t.attention_kept), ("ffn layers", t.ffn_kept)):
        if n < 1:
            raise CpmctlError(f"{where}: the target keeps no {what}")


def plan_stages(source: str, target: str) -> list[Stage]:
    """The stages from `source` to `target`: every rung in between for two names of the same ladder, else one stage
    straight from the source config to the target config."""
    src_name, tgt_name = canonical_name(source), canonical_name(target)
    ladder = _ladder_of(src_name) if src_name else None
    if ladder is not None and tgt_name is not None and tgt_name in ladder:
        i, j = ladder.index(src_name), ladder.index(tgt_name)
        if j <= i:
            raise CpmctlError(f"--to {target} is not reachable from --from {source}: it is not below it on the ladder "
                              f"({' -> '.join(ladder)})")
        names = ladder[i : j + 1]
        configs = [resolve_config(n) for n in names]
    else:
        names = [src_name or str(source), tgt_name or str(target)]
        configs = [resolve_config(source), resolve_config(target)]
    stages = []
    for k in range(len(names) - 1):
        check_reachable(configs[k], configs[k + 1], names[k], names[k + 1])
        stages.append(Stage.plan(k + 1, names[k], names[k + 1], configs[k], configs[k + 1]))
    return stages


def check_checkpoint_shape(config: CPMAntConfig, stages: list[Stage], model_path: str | Path) -> None:
    """The checkpoint must have the shape of the first stage's source (and its dim_model / dim_head)."""
    first = stages[0]
    want, have = Shape.of(first.source), Shape.of(config)
    if config.dim_model != first.source.dim_model or config.dim_head != first.source.dim_head or have != want:
        raise CpmctlError(
            f"--model {model_path} has shape ({have.describe()}, dim_model {config.dim_model}) but --from "
            f"{first.source_name} is ({want.describe()}, dim_model {first.source.dim_model})"
        )
    if config.num_layers != first.source.num_layers:
        raise CpmctlError(f"--model {model_path} has {config.num_layers} layer slots but --from "
                          f"{first.source_name} has {first.source.num_layers}")


def plan_summary(stages: list[Stage], vocab_size: int | None = None) -> list[dict]:
    """What `--dry-run` prints: per stage the structure types pruned, the target shape and the parameter counts
    (computed on the meta device: nothing is allocated)."""

    def counts(config: CPMAntConfig) -> dict[str, int]:
        if vocab_size is not None:
            config = dataclasses.replace(config, vocab_size=vocab_size)
        return param_counts(config)

    rows = []
    for stage in stages:
        source, target = counts(stage.source), counts(stage.target)
        shape = stage.target_shape
        rows.append({
            "stage": stage.index,
            "from": stage.source_name,
            "to": stage.target_name,
            "prunes": list(stage.kinds),
            "target": {
                "dim_model": stage.target.dim_model,
                "num_layers": stage.target.num_layers,
                "attention_layers_kept": shape.attention_kept,
                "ffn_layers_kept": shape.ffn_kept,
                "num_heads": shape.num_heads,
                "dim_head": stage.target.dim_head,
                "dim_ff": shape.dim_ff,
            },
            "params_total_before": source["total"],
            "params_non_embedding_before": source["non_embedding"],
            "params_total": target["total"],
            "params_non_embedding": target["non_embedding"],
            "non_embedding_kept": round(target["non_embedding"] / source["non_embedding"], 4),
        })
    return rows
