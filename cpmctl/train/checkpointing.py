"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    out_dir/step-0000500/
        config.json, model.safetensors, vocab.txt   the model part (`save_model`, default: the native format), so a
                                                     step directory is itself a loadable checkpoint
        trainer/state.pt                             step, optimizer, loss scaler, RNG states of every rank,
                                                     data reader state, metric window, extra state, the config
        trainer/params.safetensors                   the trainable parameters exactly as held in memory (folded):
                                                     reloading the native part folds again, which is not bit-exact
        trainer/sharded/                             FSDP sharded checkpoints only: model and optimizer shards
                                                     (torch.distributed.checkpoint); replaces the two files above
    out_dir/latest                                   name of the newest complete checkpoint

A checkpoint is written to `.step-XXXXXXX.tmp` and renamed into place, so an interrupted save leaves the previous
checkpoints untouched (and the next save removes it). state.pt holds only tensors and plain containers: it is read
with weights_only=True.
"""

from __future__ import annotations

import copy
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cpmctl import CpmctlError
from cpmctl.io import atomic_file, honour_umask
from cpmctl.model.ant import build_model
from cpmctl.train.engine import Engine, copy_rows, unwrap

STATE_FILE = Path("trainer") / "state.pt"
PARAMS_FILE = Path("trainer") / "params.safetensors"
SHARDED_DIR = Path("trainer") / "sharded"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete step checkpoints in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if pointer.exists():
        candidate = out_dir / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# ----- RNG states ----------------------------------------------------------------------------------------------
def capture_rng(device: torch.device) -> dict:
    """torch (CPU and the CUDA device), numpy and python RNG states, as tensors and plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----- saving --------------------------------------------------------------------------------------------------
def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered onto rank 0's CPU; the other ranks get empty dicts. A collective: every rank calls it.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _full_model_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


# ----- a full copy of a sharded model --------------------------------------------------------------------------
_SKELETON = "_cpmctl_skeleton"


def keep_skeleton(module: torch.nn.Module) -> None:
    """Remember the module's structure on the meta device (no weights) before FSDP shards it in place, so a full
    copy can be rebuilt later whatever the module holds (CPM-Ant, CPM-Ant with LoRA layers). A model sharded at
    start-up (train/sharded_start.py) kept its skeleton before sharding."""
    if _SKELETON in module.__dict__:
        return
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    module.__dict__[_SKELETON] = copy.deepcopy(module, memo)  # __dict__: not registered as a submodule


def full_copy(model, engine: Engine) -> torch.nn.Module | None:
    """The whole model as one plain module on rank 0's CPU (None on the other ranks). Under fsdp the shards are
    gathered (a collective: every rank calls it); otherwise it is the unwrapped module itself."""
    module = unwrap(model)
    if engine.kind != "fsdp":
        return module if engine.is_main else None
    full = _full_model_state(model)
    if not engine.is_main:
        return None
    skeleton = module.__dict__.get(_SKELETON)
    twin = copy.deepcopy(skeleton) if skeleton is not None else build_model(module.config, device="meta")
    twin.load_state_dict(full, assign=True)
    return twin


class _WithReplicated(torch.nn.Module):
    """The wrapped model plus the optimized tensors outside it (pruning's gates and multipliers, the same on every
    rank), so torch.distributed.checkpoint's state dicts can name every tensor the optimizer holds."""

    def __init__(self, model, tensors: list[torch.Tensor]):
        super().__init__()
        self.model = model
        self.replicated = torch.nn.ParameterList(tensors)


def _state_owner(model, optimizer):
    outside = outside_params(unwrap(model), optimizer)
    return _WithReplicated(model, outside) if outside else model


def _full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    engine: Engine,
    state: dict,
    rank_state: dict,
    save_model,
    sharded: bool = False,
    include_model: bool = True,
    keep_last: int = 0,
) -> Path:
    """Write `out_dir/step-XXXXXXX` (a collective under torch.distributed: every rank calls it).

    `state`: the small shared things (step, extra, config). `rank_state`: this rank's RNG, data reader and metric
    window; every rank's is gathered and stored. `include_model` writes the model part even for sharded
    checkpoints (the final checkpoint always has it).
    """
    name = checkpoint_name(step)
    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    module = unwrap(model)
    ranks = engine.all_gather_object(rank_state)
    if engine.is_main:
        # Any unfinished checkpoint here is a killed run's (the run directory has one writer: its lock), whichever
        # step it was for: gone before this one is written.
        for stale in out_dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    try:
        # 1. The model part, in the format its writer chooses (save_model may replace the directory: it goes first).
        if include_model:
            # FSDP: a CPU twin of the model holding the gathered weights, for the format writer.
            whole = full_copy(model, engine)
            if engine.is_main:
                save_model(whole, tmp)
            del whole
            engine.barrier()
        # 2. The exact training state.
        optimizer_state, params = None, None
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(_state_owner(model, optimizer), optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
        elif engine.kind == "fsdp":
            params = _full_model_state(model)
            optimizer_state = _full_optimizer_state(_state_owner(model, optimizer), optimizer)
            state = {**state, "outside_params": [p.detach().cpu().clone() for p in outside_params(module, optimizer)]}
        else:
            optimizer_state = optimizer.state_dict()
            trainable = _trainable_names(module)
            params = {k: v for k, v in module.state_dict().items() if k in trainable}
            state = {**state, "outside_params": [p.detach().cpu().clone() for p in outside_params(module, optimizer)]}
        if engine.is_main:
            (tmp / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
            if params is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / PARAMS_FILE))
            torch.save({**state, "optimizer": optimizer_state, "ranks": ranks, "world_size": engine.world_size,
                        "engine": engine.kind, "sharded": sharded}, tmp / STATE_FILE)
            # 3. Into place: the rename is the commit point.
            honour_umask(tmp)  # save_file writes 0600
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            with atomic_file(out_dir / LATEST) as f:
                f.write(name + "\n")
            if keep_last > 0:
                for old in list_checkpoints(out_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    engine.barrier()
    return final


def outside_params(module, optimizer) -> list[torch.Tensor]:
    """Optimized tensors that are not parameters of the model (pruning's gates and multipliers), in group order."""
    own = {id(p) for p in module.parameters()}
    return [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]


# ----- loading -------------------------------------------------------------------------------------------------
def read_state(path: Path) -> dict:
    file = path / STATE_FILE
    if not file.exists():
        raise CpmctlError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        raise CpmctlError(f"{file}: cannot read training state ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def restore_params(module: torch.nn.Module, path: Path) -> None:
    """Copy the exact saved trainable parameters into the unwrapped module (whole, or this rank's shards)."""
    file = path / PARAMS_FILE
    if not file.exists():
        raise CpmctlError(f"{path}: no {PARAMS_FILE} (a sharded checkpoint resumes only with engine fsdp)")
    try:
        saved = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CpmctlError(f"{file}: cannot read the saved parameters ({reason}); the checkpoint is damaged: "
                          "resume from an earlier one") from None
    own = dict(module.named_parameters())
    missing = sorted(_trainable_names(module) - set(saved))
    unknown = sorted(set(saved) - set(own))
    if missing or unknown:
        raise CpmctlError(f"{file}: parameters do not match the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    for key, value in saved.items():
        if own[key].shape != value.shape:
            raise CpmctlError(f"{file}: {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
        copy_rows(own[key], value)  # a model sharded at start-up: this rank's rows


def restore_optimizer_and_shards(model, optimizer, engine: Engine, path: Path, state: dict) -> None:
    """Optimizer state (and, for sharded checkpoints, the model shards) into the wrapped model's optimizer."""
    if state.get("sharded"):
        if engine.kind != "fsdp":
            raise CpmctlError(f"{path}: a sharded checkpoint resumes only with train.engine=fsdp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        owner = _state_owner(model, optimizer)
        model_sd, optim_sd = get_state_dict(owner, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(owner, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    elif engine.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(_state_owner(model, optimizer), optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        _restore_outside(model, optimizer, path, state)
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CpmctlError(f"{path}: optimizer state does not match this run's parameters ({e})") from None
        _restore_outside(model, optimizer, path, state)


def _restore_outside(model, optimizer, path: Path, state: dict) -> None:
    """The optimized tensors outside the model (saved by value in full checkpoints)."""
    outside, saved = outside_params(unwrap(model), optimizer), state.get("outside_params", [])
    if len(outside) != len(saved):
        raise CpmctlError(f"{path}: {len(saved)} optimized tensors outside the model were saved, this run has "
                          f"{len(outside)}")
    with torch.no_grad():
        for p, value in zip(outside, saved):
            p.copy_(value)


def check_compatible(path: Path, state: dict, engine: Engine) -> None:
    if state.get("world_size") != engine.world_size:
        raise CpmctlError(
            f"{path}: saved by {state.get('world_size')} processes, resuming with {engine.world_size}: "
            "resume with the same process count"
        )
    if state.get("sharded") and engine.kind != "fsdp":
        raise CpmctlError(f"{path}: a sharded checkpoint resumes only with train.engine=fsdp")
    if (state.get("engine") == "fsdp") != (engine.kind == "fsdp") and not state.get("sharded"):
        # Full checkpoints hold index-keyed (single/ddp) or name-keyed (fsdp) optimizer state.
        raise CpmctlError(f"{path}: saved with engine {state.get('engine')}, resuming with {engine.kind}")
