"""CPMAntConfig: the original config JSON (cpm-ant-10b.json keys) as a typed dataclass, and the size ladder."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.resources import configs_dir

CONFIG_DIR = configs_dir()  # the ladder configs that ship with cpmctl (cpmctl/resources.py)

# The published ladder, largest first (shared/reference/cpm-ant.md section 2), and a CPU mini ladder with the
# same structure: stage by stage, layers dropped, then heads and dim_ff narrowed.
LADDER = ["10b", "7b", "3b", "2b", "1b", "300m"]
MINI_LADDER = ["mini-10b", "mini-7b", "mini-3b", "mini-2b", "mini-1b", "mini-300m"]


@dataclass
class CPMAntConfig:
    vocab_size: int = 30720
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 512
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    half: bool = True
    prompt_types: int = 32
    prompt_length: int = 32
    segment_types: int = 32
    # One [drop_attention, drop_ffn] pair per layer; empty = nothing dropped.
    mask_modules: list[list[bool]] = field(default_factory=list)

    def __post_init__(self):
        if self.mask_modules:
            if len(self.mask_modules) != self.num_layers:
                raise CpmctlError(
                    f"config: mask_modules has {len(self.mask_modules)} pairs but num_layers is {self.num_layers}"
                )
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        for name in ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head"):
            if int(getattr(self, name)) <= 0:
                raise CpmctlError(f"config: {name} must be positive, got {getattr(self, name)}")

    # ----- structure ---------------------------------------------------------------------------------------
    def has_attention(self, layer: int) -> bool:
        return not (self.mask_modules and self.mask_modules[layer][0])

    def has_ffn(self, layer: int) -> bool:
        return not (self.mask_modules and self.mask_modules[layer][1])

    @property
    def num_attention_kept(self) -> int:
        return sum(self.has_attention(i) for i in range(self.num_layers))

    @property
    def num_ffn_kept(self) -> int:
        return sum(self.has_ffn(i) for i in range(self.num_layers))

    @property
    def num_prompts(self) -> int:
        return self.prompt_types * self.prompt_length

    # ----- JSON ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["mask_modules"]:
            del out["mask_modules"]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "CPMAntConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {', '.join(unknown)}", stacklevel=2)
        kwargs = {}
        for name, f in known.items():
            if name not in data:
                continue
            value = data[name]
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                    raise CpmctlError(f"{source}: key '{name}' must be an integer, got {value!r}")
                value = int(value)
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise CpmctlError(f"{source}: key '{name}' must be a number, got {value!r}")
                value = float(value)
            elif f.type in ("bool", bool):
                value = bool(value)
            elif name == "mask_modules":
                if not isinstance(value, list) or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 for p in value
                ):
                    raise CpmctlError(f"{source}: key 'mask_modules' must be a list of [attention, ffn] pairs")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "CPMAntConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CpmctlError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CpmctlError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CpmctlError(f"{path}: a config must be a JSON object")
        if data.get("model_type") == "cpmant":
            return from_hf_config(data, str(path))
        return cls.from_dict(data, str(path))


def from_hf_config(data: dict, source: str = "config.json") -> CPMAntConfig:
    """Map HF transformers' CpmAntConfig keys onto the original ones."""
    mapping = {
        "hidden_size": "dim_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
    }
    converted = {}
    for key, value in data.items():
        key = mapping.get(key, key)
        if key in {f.name for f in dataclasses.fields(CPMAntConfig)}:
            converted[key] = value
    return CPMAntConfig.from_dict(converted, source)


def to_hf_config(config: CPMAntConfig) -> dict:
    """transformers' CpmAntConfig keys. `mask_modules` is an extra key transformers keeps but does not read: the
    HF model runs the dropped sub-blocks as all-zero weights (checkpoint.to_hf_state_dict), and cpmctl reading the
    export back gets the pruned model again."""
    extra = {"mask_modules": config.mask_modules} if config.mask_modules else {}
    return {
        "model_type": "cpmant",
        "architectures": ["CpmAntForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim_model,
        "num_attention_heads": config.num_heads,
        "dim_head": config.dim_head,
        "dim_ff": config.dim_ff,
        "num_hidden_layers": config.num_layers,
        "dropout_p": config.dropout_p,
        "position_bias_num_buckets": config.position_bias_num_buckets,
        "position_bias_max_distance": config.position_bias_max_distance,
        "eps": config.eps,
        "init_std": 1.0,
        "prompt_types": config.prompt_types,
        "prompt_length": config.prompt_length,
        "segment_types": config.segment_types,
        "use_cache": True,
        **extra,
    }


def ladder_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config(name_or_path: str | Path) -> CPMAntConfig:
    """A ladder name (10b, cpm-ant-10b, mini-7b), a config JSON file, or a checkpoint directory."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir() and (path / "config.json").exists():
        return CPMAntConfig.from_json(path / "config.json")
    if path.suffix == ".json" or path.exists():
        return CPMAntConfig.from_json(path)
    for candidate in (CONFIG_DIR / f"{text}.json", CONFIG_DIR / f"cpm-ant-{text}.json"):
        if candidate.exists():
            return CPMAntConfig.from_json(candidate)
    raise CpmctlError(f"unknown config '{text}': not a file, and not one of {', '.join(ladder_names())}")


def canonical_name(name_or_path: str | Path) -> str | None:
    """The ladder name of a config ('10b', 'mini-7b'), or None for a user file."""
    text = str(name_or_path)
    if text.startswith("cpm-ant-"):
        text = text[len("cpm-ant-") :]
    return text if text in LADDER or text in MINI_LADDER else None
