"""LoRA on the folded CPM-Ant through peft: inject, count, save and load adapters in peft's format, merge.

The model keeps its class: peft's `inject_adapter_in_model` swaps the target nn.Linear modules for peft LoRA layers in
place, so decoding, the KV cache and the training loop see the same CPMAnt they always see. Because the model holds
folded weights (plain nn.Linear), the LoRA delta adds to the same linear the original computes and a merge is exact.

An adapter directory is what `PeftModel.save_pretrained` writes for transformers' `CpmAntForCausalLM`
(adapter_config.json + adapter_model.safetensors, keys `base_model.model.cpmant.<module>.lora_A.weight`: HF's module
path, ours under its `cpmant.` attribute), so plain `PeftModel.from_pretrained(hf_model, DIR)` applies it to an
export of the base model, and adapters trained with peft on the HF model load here. Beside it `cpmctl_adapter.json`
records the base model's config (an adapter trained on one model shape is refused by another) and the base
checkpoint's absolute path and sha256 (an adapter is refused on other weights unless CPMCTL_ADAPTER_BASE_CHECK=warn).
Adapters of cpmctl before version 2 of the file (keys without `cpmant.`) still load.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cpmctl import CpmctlError
from cpmctl.io import atomic_dir
from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.config import CPMAntConfig
from cpmctl.model.fingerprint import base_record, same_base
from cpmctl.model.hf_layout import HF_PREFIX
from cpmctl.recipe import at_least, check_recipe, fail, positive, within

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "cpmctl_adapter.json"
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the keys
ADAPTER_KEY_PREFIX = PEFT_PREFIX + HF_PREFIX  # ... of a LoRA on CpmAntForCausalLM, whose network is `cpmant`
ADAPTER_NAME = "default"
ADAPTER_VERSION = 2  # 2: keys with the `cpmant.` prefix, the base model's path and hash; 1: neither
BASE_CHECK_ENV = "CPMCTL_ADAPTER_BASE_CHECK"  # error (default) | warn: an adapter on weights other than its base
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
# peft settings that change what the saved weights mean (or which modules hold them) and that cpmctl's LoRA does
# not apply, with their "off" values: an adapter using one is refused rather than loaded with a different effect.
_UNSUPPORTED_PEFT = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
                     "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
                     "exclude_modules": None, "layer_replication": None, "target_parameters": None,
                     "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
                     "use_bdlora": None, "velora_config": None, "monteclora_config": None, "kasa_config": None,
                     "arrow_config": None}

# The nn.Linear modules of a CPM-Ant block that LoRA may adapt.
LINEAR_TARGETS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
# The config keys that fix the shapes an adapter depends on.
SHAPE_KEYS = ("dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "mask_modules")


@dataclass
class LoraSettings:
    """The recipe section `lora:`. Defaults are the original CPM-Ant delta tuning (r 8, alpha 16, q and v)."""

    r: int = 8  # rank of each low-rank update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input
    targets: list[str] = field(default_factory=lambda: ["project_q", "project_v"])  # linear layers adapted
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    dora: bool = False  # weight-decomposed LoRA (magnitude vector per output channel)

    def check(self, at: str) -> None:
        """The rules a type cannot state, with the section's key path (`lora.r`); cpmctl/recipe.py calls it."""
        at_least(self, at, "r", 1)
        positive(self, at, "alpha")
        within(self, at, "dropout", 0.0, 1.0, open_high=True)
        if not self.targets:
            fail(at, "targets", "must name at least one of " + ", ".join(LINEAR_TARGETS))
        unknown = [t for t in self.targets if t not in LINEAR_TARGETS]
        if unknown:
            fail(at, "targets", f"unknown module '{unknown[0]}' (known: {', '.join(LINEAR_TARGETS)})")

    def validate(self) -> None:
        """Settings built in Python or read from an adapter: the checks a loaded recipe's `lora:` section gets."""
        check_recipe(self, "lora")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def peft_config(self, base_model: str | None = None, task_type: str | None = None):
        from peft import LoraConfig

        self.validate()
        return LoraConfig(
            task_type=task_type,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            use_rslora=self.rslora,
            use_dora=self.dora,
            bias="none",
            base_model_name_or_path=base_model,
        )

    @classmethod
    def from_peft_config(cls, config, targets: list[str] | None = None) -> "LoraSettings":
        """`targets`: the module names the weights adapt, when the config's target_modules is not a list of them
        (a regex, or full module paths)."""
        if targets is None:
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [targets]
        return cls(
            r=int(config.r),
            alpha=float(config.lora_alpha),
            dropout=float(config.lora_dropout),
            targets=list(targets),
            rslora=bool(config.use_rslora),
            dora=bool(config.use_dora),
        )


def base_config(model: str | Path) -> CPMAntConfig:
    """The config of a checkpoint (any format), a config JSON or a ladder name ('10b'), without reading weights."""
    from cpmctl.model.checkpoint import read_config
    from cpmctl.model.config import resolve_config

    if Path(model).exists() and not str(model).endswith(".json"):
        return read_config(model)[0]
    return resolve_config(model)


# ----- injection and counts ------------------------------------------------------------------------------------
def inject_lora(model: CPMAnt, settings: LoraSettings, base_model: str | None = None) -> CPMAnt:
    """Add LoRA layers to `model` in place and freeze everything else. Returns the same model object."""
    from peft import inject_adapter_in_model

    config = settings.peft_config(base_model)
    with warnings.catch_warnings():
        # peft warns about models that are not transformers PreTrainedModels; ours is a plain nn.Module on purpose.
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    return model


def lora_initial_value(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    """peft's default start, drawn from `generator` in named_parameters() order (so a sharded start matches one
    process): lora_A uniform in +-1/sqrt(in_features) (kaiming_uniform, a = sqrt(5)), lora_B zero."""
    if ".lora_A." in name:
        bound = 1.0 / math.sqrt(shape[1])
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    if ".lora_B." in name:
        return torch.zeros(shape, dtype=torch.float32)
    raise CpmctlError(f"internal: no seeded start for {name} (DoRA's magnitude comes from the base)", exit_code=1)


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Seeded start of every LoRA A and B; DoRA's magnitude vectors keep peft's value (the base rows' norms)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(lora_initial_value(name, p.shape, generator))


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def parameter_counts(model: nn.Module) -> dict:
    """Trainable (LoRA) and total parameters (frozen base + LoRA); works on the meta device."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


def dry_run_counts(config: CPMAntConfig, settings: LoraSettings) -> dict:
    """Trainable and total parameters of the LoRA model from the config alone: built on the meta device, no weights."""
    model = build_model(config, device="meta")
    inject_lora(model, settings)
    counts = parameter_counts(model)
    counts["lora_modules"] = len(lora_modules(model))
    return counts


# ----- adapter state -------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with the key names peft gives them on CpmAntForCausalLM
    (`base_model.model.cpmant.<module>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: we never adapt embeddings, and "auto" would look the base model up (even on the
    # Hugging Face hub) to see whether its vocabulary was resized.
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {ADAPTER_KEY_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def adapter_meta(config: CPMAntConfig | None, **extra) -> dict:
    """cpmctl_adapter.json. `model` (the base as given), when it is a path, is recorded absolute."""
    if extra.get("model") is not None and Path(extra["model"]).exists():
        extra["model"] = str(Path(extra["model"]).resolve())
    return {"format": "cpmctl-lora", "version": ADAPTER_VERSION,
            "base_config": config.to_dict() if config is not None else None, **extra}


# ----- the base model's identity ------------------------------------------------------------------------------
def check_adapter_base(adapter: "Adapter", model_path: str | Path, policy: str | None = None) -> None:
    """Refuse an adapter on weights other than the ones it was trained on (the recorded sha256). `policy` (default:
    $CPMCTL_ADAPTER_BASE_CHECK, else "error"): "warn" loads it anyway with a warning on stderr."""
    recorded = (adapter.meta or {}).get("base_model")
    if not recorded or not recorded.get("files"):
        return  # an adapter from peft, an older cpmctl or an import without a base checkpoint: nothing to compare
    policy = policy or os.environ.get(BASE_CHECK_ENV) or "error"
    if policy not in ("error", "warn"):
        raise CpmctlError(f"{BASE_CHECK_ENV} must be error or warn, got '{policy}'")
    same, ours = same_base(recorded, Path(model_path))
    if same:
        return
    short = lambda hashes: ", ".join(h[:12] for h in hashes)  # noqa: E731
    text = (f"adapter {adapter.path} was trained on {recorded.get('path')} (sha256 "
            f"{short([f['sha256'] for f in recorded['files']])}), but {model_path} holds other weights (sha256 "
            f"{short(ours)})")
    if policy == "error":
        raise CpmctlError(text + f"; to load it anyway set {BASE_CHECK_ENV}=warn")
    from cpmctl.progress import stderr

    stderr.print(f"[bold yellow]warning:[/] {text}; loading it anyway ({BASE_CHECK_ENV}=warn)")


def save_adapter(model: CPMAnt, out: str | Path, settings: LoraSettings, meta: dict | None = None,
                 base_model: str | None = None) -> Path:
    """Write an adapter directory atomically (peft's layout + cpmctl_adapter.json)."""
    return write_adapter(out, adapter_state_dict(model), settings, meta or adapter_meta(model.config), base_model)


def write_adapter(out: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings, meta: dict,
                  base_model: str | None = None, output=None, replace: bool = False) -> Path:
    """`output`: the outputs.claim() of a command; without it an existing `out` is replaced only with `replace`."""
    with (output.directory() if output is not None else atomic_dir(out, replace=replace)) as tmp:
        write_adapter_files(tmp, state, settings, meta, base_model)
    return Path(out)


def write_adapter_files(directory: Path, state: dict[str, torch.Tensor], settings: LoraSettings, meta: dict,
                        base_model: str | None = None) -> None:
    """The three adapter files into an existing directory (a training checkpoint's, which is itself atomic).
    `base_model`, a checkpoint on disk, is recorded by absolute path and sha256 (`base_record`)."""
    from safetensors.torch import save_file

    base = base_record(base_model)
    if base is not None:
        meta = {**meta, "base_model": base}
    # task_type CAUSAL_LM: PeftModel.from_pretrained then gives a PeftModelForCausalLM, which has `generate`.
    settings.peft_config(base["path"] if base else base_model, task_type="CAUSAL_LM").save_pretrained(str(directory))
    save_file(state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (Path(directory) / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class Adapter:
    path: Path
    settings: LoraSettings
    state: dict[str, torch.Tensor]  # keys without the `base_model.model.` prefix
    meta: dict

    @property
    def base_config(self) -> dict | None:
        return self.meta.get("base_config")


def read_adapter(path: str | Path) -> Adapter:
    from peft import LoraConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CpmctlError(f"adapter not found: {path} (expected a directory with {ADAPTER_CONFIG})")
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.exists():
            raise CpmctlError(f"{path}: not an adapter directory (no {f.name})")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CpmctlError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise CpmctlError(f"{cfg_file}: not a LoRA adapter config (peft_type is {raw.get('peft_type')!r})")
    for key, off in _UNSUPPORTED_PEFT.items():
        if raw.get(key) not in (off, None, {}, [], False, "none"):
            raise CpmctlError(f"{cfg_file}: {key} = {raw[key]!r} is a peft feature cpmctl's LoRA does not apply; "
                              "refusing the adapter rather than loading it with another effect")
    try:
        stored = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CpmctlError(f"{weights}: cannot read safetensors file ({str(e).splitlines()[0][:160]})") from None
    state = _cpmctl_keys(stored, weights)
    known = set(LoraConfig.__dataclass_fields__)
    try:
        peft_config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CpmctlError(f"{cfg_file}: invalid LoRA config ({e})") from None
    settings = LoraSettings.from_peft_config(peft_config, _adapted_targets(state, peft_config, path))
    settings.validate()
    meta = {}
    if (path / ADAPTER_META).exists():
        try:
            meta = json.loads((path / ADAPTER_META).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CpmctlError(f"{path / ADAPTER_META}: not valid JSON ({e})") from None
    return Adapter(path, settings, state, meta)


def _cpmctl_keys(stored: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Saved keys -> our module names: peft's `base_model.model.` and HF's `cpmant.` prefixes off (an adapter of
    cpmctl before version 2 has no `cpmant.`)."""
    state = {}
    for key, t in stored.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        if name in state:
            raise CpmctlError(f"{source}: {key} is there twice, with and without the {HF_PREFIX} prefix")
        state[name] = t
    return state


def _adapted_targets(state: dict[str, torch.Tensor], config, path: Path) -> list[str]:
    """The linear names the weights adapt (project_q, ...), checked against the config's target_modules when those
    are a list (a regex names no module: the weights decide)."""
    adapted = set()
    for key in state:
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            adapted.add(key[: -len(suffix)].rpartition(".")[2])
    if not adapted:
        raise CpmctlError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA weights (no *.lora_A.weight keys)")
    unknown = sorted(adapted - set(LINEAR_TARGETS))
    if unknown:
        raise CpmctlError(f"{path}: adapts {unknown[0]}, which cpmctl's LoRA cannot adapt (it adapts "
                          f"{', '.join(LINEAR_TARGETS)})")
    listed = config.target_modules
    if isinstance(listed, (list, set, tuple)):
        named = {t.rpartition(".")[2] for t in listed}
        if named != adapted:
            raise CpmctlError(f"{path / ADAPTER_CONFIG}: target_modules {', '.join(sorted(named))} but the weights "
                              f"adapt {', '.join(sorted(adapted))}")
    return sorted(adapted)


def check_adapter_fits(adapter: Adapter, config: CPMAntConfig, model_name: str = "the model") -> None:
    """Refuse an adapter whose recorded base shape differs from the model's, naming the differing keys."""
    base = adapter.base_config
    if not base:
        return  # imported without a base config: the tensor shapes are still checked on load
    ours = config.to_dict()
    diffs = []
    for key in SHAPE_KEYS:
        empty = [] if key == "mask_modules" else None
        a, b = base.get(key, empty), ours.get(key, empty)
        if a != b:
            diffs.append(key if key == "mask_modules" else f"{key} {a} != {b}")
    if diffs:
        raise CpmctlError(
            f"adapter {adapter.path} was trained on another model shape than {model_name}: " + ", ".join(diffs)
        )


def load_adapter(model: CPMAnt, adapter: str | Path | Adapter, model_name: str = "the model") -> CPMAnt:
    """Inject the adapter's LoRA layers into `model` and load its weights (shapes checked key by key)."""
    from peft import set_peft_model_state_dict

    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    check_adapter_fits(adapter, model.config, model_name)
    inject_lora(model, adapter.settings)
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    expected = {k[len(ADAPTER_KEY_PREFIX):]: s for k, s in expected.items()}
    missing = sorted(set(expected) - set(adapter.state))
    unexpected = sorted(set(adapter.state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(adapter.state) if tuple(adapter.state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        first = (missing or unexpected or misshaped)[0]
        what = "missing" if missing else "unexpected" if unexpected else "mis-shaped"
        detail = f" {tuple(adapter.state[first].shape)} != {expected[first]}" if what == "mis-shaped" else ""
        raise CpmctlError(
            f"adapter {adapter.path} does not fit {model_name}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped keys (first {what}: {first}{detail})"
        )
    dtype = model.input_embedding.weight.dtype
    state = {k: v.to(dtype) for k, v in adapter.state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    return model


def load_model_with_adapter(path: str | Path, adapter: str | Path | None = None, device="cpu",
                            dtype: torch.dtype | None = torch.float32, base_check: str | None = None):
    """`load_model` plus, when `adapter` is given, its LoRA layers (unmerged). Returns (model, info).
    `base_check`: see check_adapter_base."""
    from cpmctl.model.checkpoint import load_model

    adapter_obj = read_adapter(adapter) if adapter is not None else None
    if adapter_obj is not None:
        from cpmctl.model.checkpoint import read_config

        check_adapter_fits(adapter_obj, read_config(path)[0], str(path))  # before reading any weights
        check_adapter_base(adapter_obj, path, base_check)
    model, info = load_model(path, device=device, dtype=dtype)
    if adapter_obj is not None:
        load_adapter(model, adapter_obj, str(path))
        model.requires_grad_(False)
        model.eval()
    return model, info


# ----- merge ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: CPMAnt) -> CPMAnt:
    """Fold every LoRA delta into its base weight and put the plain nn.Linear back (in place)."""
    for name, module in lora_modules(model).items():
        module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_adapter(model_path: str | Path, adapter: str | Path, out: str | Path,
                  vocab: str | Path | None = None, force: bool = False) -> dict:
    """Write a native checkpoint with the adapter merged into the base weights. Merged in fp32, saved in the
    checkpoint's own dtype. `out` follows the output policy (cpmctl/outputs.py): never the base model itself."""
    from cpmctl.model.checkpoint import save_native
    from cpmctl.outputs import claim

    output = claim(out, "tune merge", force=force, inputs=[model_path, adapter, vocab])
    model, info = load_model_with_adapter(model_path, adapter, dtype=torch.float32)
    merge_lora(model)
    save_native(model, out, vocab=vocab or info.vocab, dtype=info.dtype, output=output)
    return {"model": str(model_path), "adapter": str(adapter), "out": str(out), "dtype": str(info.dtype or "float32")}
