"""Checkpoint formats.

- original: a BMTrain-saved `.pt` state dict (weights in the original convention, usually fp16) with the config
  `.json` beside it (same stem, or config.json in the same directory).
- native (ours): a directory with `config.json` (original keys), `model.safetensors` (weights in the original
  convention, so original <-> native is a lossless re-container in any dtype) and `vocab.txt`.
- hf: `CpmAntForCausalLM.save_pretrained` output: config.json (model_type cpmant) + safetensors or .bin, folded
  weights under the `cpmant.` prefix, prompt rows appended to the input embedding, `lm_head.weight` a copy of the
  vocabulary rows; pruned models with their dropped sub-blocks as zeros (the key mapping: hf_layout.py).

In memory the model holds folded weights (see ant.py); `fold` / `unfold` convert, using the dims of the config in
hand, so pruned models fold and unfold with their pruned dims.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cpmctl import CpmctlError
from cpmctl.io import atomic_dir, atomic_path
from cpmctl.model.ant import CPMAnt, build_model
from cpmctl.model.config import CPMAntConfig, to_hf_config
from cpmctl.model.hf_layout import (HF_TOKENIZER_CONFIG, from_hf_state_dict, hf_generation_config,
                                     hf_tokenizer_config, to_hf_state_dict)
from cpmctl.outputs import claim

NATIVE_WEIGHTS = "model.safetensors"
VOCAB_FILE = "vocab.txt"
# One key: safetensors writes its metadata map in hash order, so two keys could come out in either order and the
# same model would not give the same bytes twice. The weights are always in the original convention.
NATIVE_METADATA = {"format": "cpmctl-native-original-convention"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- folding -------------------------------------------------------------------------------------------------
def fold_factor(key: str, shape, config: CPMAntConfig) -> float:
    """The factor the original applies in the op: 1/sqrt(dim_model) for embeddings, 1/sqrt(in) for linears."""
    if key.endswith("embedding.weight"):
        return 1.0 / math.sqrt(config.dim_model)
    if key.endswith("layernorm.weight") or "layernorm_before" in key or key.startswith("position_bias"):
        return 1.0
    if len(shape) == 2:
        return 1.0 / math.sqrt(shape[1])
    return 1.0


def fold(state: dict, config: CPMAntConfig, dtype=None) -> dict:
    """Original-convention weights -> folded (in-memory) weights."""
    out = {}
    for key, t in state.items():
        f = fold_factor(key, t.shape, config)
        target = dtype or t.dtype
        out[key] = t.to(target) if f == 1.0 else (t.float() * f).to(target)
    return out


def unfold(state: dict, config: CPMAntConfig, dtype=None) -> dict:
    """Folded (in-memory) weights -> original-convention weights."""
    out = {}
    for key, t in state.items():
        f = fold_factor(key, t.shape, config)
        target = dtype or t.dtype
        t = t.detach()
        out[key] = t.to(target).clone() if f == 1.0 else (t.float() / f).to(target)
    return out


# ----- key checks ----------------------------------------------------------------------------------------------
def expected_shapes(config: CPMAntConfig) -> dict[str, tuple]:
    model = build_model(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state: dict, config: CPMAntConfig, source: str) -> None:
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_preview(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_preview(unexpected)})")
        if misshaped:
            shapes = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in misshaped]
            parts.append(f"mis-shaped {len(misshaped)} keys ({_preview(shapes)})")
        raise CpmctlError(f"{source}: checkpoint does not match its config: " + "; ".join(parts))


def _preview(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")


# ----- format detection ----------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    path: Path
    format: str  # native | original | hf
    config: CPMAntConfig
    dtype: torch.dtype | None = None
    vocab: Path | None = None


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CpmctlError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix in (".pt", ".bin", ".pth"):
            return "original"
        if path.suffix == ".safetensors":
            return "native"
        raise CpmctlError(f"{path}: not a checkpoint (expected a .pt file or a checkpoint directory)")
    cfg = path / "config.json"
    if not cfg.exists():
        raise CpmctlError(f"{path}: no config.json in the checkpoint directory")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CpmctlError(f"{cfg}: not valid JSON ({e})") from None
    if model_type == "cpmant":
        return "hf"
    if (path / NATIVE_WEIGHTS).exists():
        return "native"
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1:
        return "original"
    raise CpmctlError(f"{path}: no {NATIVE_WEIGHTS} (native) and no single .pt file (original) in the directory")


def _original_files(path: Path) -> tuple[Path, Path]:
    pt = path if path.is_file() else sorted(path.glob("*.pt"))[0]
    for cfg in (pt.with_suffix(".json"), pt.parent / "config.json"):
        if cfg.exists():
            return pt, cfg
    raise CpmctlError(f"{pt}: no config beside it (expected {pt.with_suffix('.json').name} or config.json)")


def _find_vocab(*dirs: Path) -> Path | None:
    for d in dirs:
        if (d / VOCAB_FILE).exists():
            return d / VOCAB_FILE
    return None


def vocab_beside(path: str | Path) -> Path | None:
    """vocab.txt beside a checkpoint (native dir or file, original .pt or its directory, HF dir), without reading
    any weights."""
    path = Path(path)
    return _find_vocab(path if path.is_dir() else path.parent)


def find_vocab(checkpoint: str | Path, given: str | Path | None = None) -> Path:
    """The vocabulary of a checkpoint: `given` when set (it must exist), else vocab.txt beside the checkpoint."""
    if given is not None:
        if not Path(given).exists():
            raise CpmctlError(f"vocab file not found: {given}")
        return Path(given)
    found = vocab_beside(checkpoint)
    if found is None:
        raise CpmctlError(f"{checkpoint}: no vocab.txt beside the checkpoint; pass --vocab FILE")
    return found


def load_tokenizer(checkpoint: str | Path, given: str | Path | None = None, vocab_size: int | None = None):
    """The tokenizer of `find_vocab`, checked against the model's vocab_size when given."""
    from cpmctl.model.tokenizer import CPMAntTokenizer

    tokenizer = CPMAntTokenizer(find_vocab(checkpoint, given))
    if vocab_size is not None:
        check_vocab_size(tokenizer, vocab_size, checkpoint)
    return tokenizer


def check_vocab_size(tokenizer, vocab_size: int, checkpoint: str | Path = "the model") -> None:
    if tokenizer.vocab_size != vocab_size:
        raise CpmctlError(f"vocab has {tokenizer.vocab_size} tokens but the model expects {vocab_size}: "
                          f"wrong --vocab for {checkpoint} ({tokenizer.path})")


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CpmctlError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:
        # torch's text is a paragraph of advice; the reason is on its "WeightsUnpickler error:" line.
        reason = next((line.split("error:", 1)[1].split(". ")[0].strip() for line in str(e).splitlines()
                       if "WeightsUnpickler error:" in line), type(e).__name__)
        raise CpmctlError(f"{path}: holds more than tensors ({reason}); cpmctl reads only plain state dicts, it "
                          "never runs code from a checkpoint") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CpmctlError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CpmctlError(f"{path}: not a state dict of tensors")
    return state


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text, cut at a word boundary (with an ellipsis) if it is long."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _safetensors_load(path: Path) -> dict:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CpmctlError(f"checkpoint not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CpmctlError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0][:160]})") from None


# ----- reading -------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> tuple[CheckpointInfo, dict]:
    """Read any supported format; returns the info and the state dict in the ORIGINAL convention."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "original":
        pt, cfg = _original_files(path)
        config = CPMAntConfig.from_json(cfg)
        state = _torch_load(pt)
        check_state_dict(state, config, str(pt))
        vocab = _find_vocab(pt.parent)
    elif fmt == "native":
        root = path if path.is_dir() else path.parent
        config = CPMAntConfig.from_json(root / "config.json")
        weights = path if path.is_file() else root / NATIVE_WEIGHTS
        state = _safetensors_load(weights)
        check_state_dict(state, config, str(weights))
        vocab = _find_vocab(root)
    else:
        config = CPMAntConfig.from_json(path / "config.json")
        files = sorted(path.glob("*.safetensors"))
        if files:
            state = {}
            for f in files:
                state.update(_safetensors_load(f))
        elif (path / "pytorch_model.bin").exists():
            state = _torch_load(path / "pytorch_model.bin")
        else:
            raise CpmctlError(f"{path}: HF checkpoint has no *.safetensors or pytorch_model.bin")
        folded = from_hf_state_dict(state, config, str(path))
        check_state_dict(folded, config, str(path))
        state = unfold(folded, config)
        vocab = _find_vocab(path)
    dtypes = {t.dtype for t in state.values()}
    info = CheckpointInfo(path, fmt, config, dtypes.pop() if len(dtypes) == 1 else None, vocab)
    return info, state


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32) -> tuple[CPMAnt, CheckpointInfo]:
    """A ready model (folded weights) from any format. dtype None keeps the checkpoint's dtype."""
    info, state = read_checkpoint(path)
    target = dtype or info.dtype or torch.float32
    model = build_model(info.config, device="meta", dtype=target)
    folded = fold(state, info.config, dtype=target)
    model.load_state_dict(folded, assign=True)
    model = model.to(device)
    model.eval()
    return model, info


def weight_files(path: str | Path) -> list[Path]:
    """The file(s) holding a checkpoint's weights (what an adapter's base-model hash covers), without reading them."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "original":
        return [_original_files(path)[0]]
    if fmt == "native":
        return [path if path.is_file() else path / NATIVE_WEIGHTS]
    files = sorted(path.glob("*.safetensors")) or [path / "pytorch_model.bin"]
    return [f for f in files if f.exists()]


def read_config(path: str | Path) -> tuple[CPMAntConfig, str]:
    """The config of a checkpoint without reading its weights."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "original":
        return CPMAntConfig.from_json(_original_files(path)[1]), fmt
    root = path if path.is_dir() else path.parent
    return CPMAntConfig.from_json(root / "config.json"), fmt


# ----- HF layout -----------------------------------------------------------------------------------------------
# ----- writing -------------------------------------------------------------------------------------------------
def model_state(model: CPMAnt, dtype=None) -> dict:
    """The model's weights in the original convention (what both on-disk formats hold)."""
    return unfold({k: v for k, v in model.state_dict().items()}, model.config, dtype)


def save_native(model: CPMAnt, out: str | Path, vocab: str | Path | None = None, dtype=None, extra: dict | None = None,
                output=None, replace: bool = False):
    """Write a native checkpoint directory atomically. `extra` files: {name: text} written beside. `output`: the
    outputs.claim() of a command (it marks the directory as that command's); without it an existing `out` is
    replaced only with `replace=True` (a run's own sub-directory)."""
    state = {k: v.contiguous() for k, v in model_state(model, dtype).items()}
    with (output.directory() if output is not None else atomic_dir(out, replace=replace)) as tmp:
        model.config.save(tmp / "config.json")
        save_file(state, str(tmp / NATIVE_WEIGHTS), metadata=NATIVE_METADATA)
        if vocab is not None:
            shutil.copyfile(vocab, tmp / VOCAB_FILE)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def save_original(model: CPMAnt, out: str | Path, dtype=None) -> tuple[Path, Path]:
    """Write `<out>.pt` (state dict) and `<out>.json` (config) as the original code expects them."""
    out = Path(out)
    pt = out if out.suffix == ".pt" else out.with_suffix(".pt")
    if dtype is None:
        dtype = torch.float16 if model.config.half else None
    state = model_state(model, dtype)
    with atomic_path(pt) as tmp:
        torch.save(state, tmp)
    cfg = pt.with_suffix(".json")
    with atomic_path(cfg) as tmp:
        model.config.save(tmp)
    return pt, cfg


def convert(src: str | Path, to: str, out: str | Path, vocab: str | Path | None = None, force: bool = False) -> Path:
    """Lossless re-container between native and original (no folding: both hold original-convention weights).
    `out` follows the output policy of cpmctl/outputs.py (checked before reading any weights)."""
    if to not in ("native", "original", "hf"):
        raise CpmctlError(f"unknown target format '{to}' (native, original, hf)")
    out, src_path = Path(out), Path(src)
    inputs = [src, vocab] + ([src_path.with_suffix(".json")] if src_path.suffix == ".pt" else [])
    if to == "original" and out.suffix == ".pt":
        outputs = [claim(p, "model convert", kind="file", force=force, inputs=inputs) for p in (out, out.with_suffix(".json"))]
    else:
        output = claim(out, "model convert", force=force, inputs=inputs)
    info, state = read_checkpoint(src)
    vocab = vocab or info.vocab
    if to == "native":
        with output.directory() as tmp:
            info.config.save(tmp / "config.json")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / NATIVE_WEIGHTS),
                      metadata=NATIVE_METADATA)
            if vocab:
                shutil.copyfile(vocab, tmp / VOCAB_FILE)
        return Path(out)
    if to == "original":
        if out.suffix != ".pt":  # a directory: model.pt, model.json, vocab.txt
            with output.directory() as tmp:
                torch.save(state, tmp / "model.pt")
                info.config.save(tmp / "model.json")
                if vocab:
                    shutil.copyfile(vocab, tmp / VOCAB_FILE)
            return out / "model.pt"
        with outputs[0].path_for_writer() as tmp:
            torch.save(state, tmp)
        with outputs[1].path_for_writer() as tmp:
            info.config.save(tmp)
        if vocab and not (out.parent / VOCAB_FILE).exists():
            shutil.copyfile(vocab, out.parent / VOCAB_FILE)
        return out
    if to == "hf":
        folded = fold(state, info.config)
        hf = to_hf_state_dict(folded, info.config)
        with output.directory() as tmp:
            (tmp / "config.json").write_text(json.dumps(to_hf_config(info.config), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(hf_generation_config(), indent=2) + "\n")
            save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if vocab:  # without a vocabulary there is no tokenizer to write (the CLI says so)
                shutil.copyfile(vocab, tmp / VOCAB_FILE)
                (tmp / HF_TOKENIZER_CONFIG).write_text(json.dumps(hf_tokenizer_config(), indent=2) + "\n")
        return Path(out)
    raise AssertionError(to)
