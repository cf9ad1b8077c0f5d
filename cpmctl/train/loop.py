"""The one training loop. Pretraining, pruning recovery and LoRA tuning all call `train()`.

Read top to bottom: the optimizer's parameter groups, then `train()`: set up the engine, resume if asked, and run
steps of `grad_accum` micro-batches; log, validate and checkpoint on their schedules. The settings are a
TrainConfig (a recipe's `train:` section, train/recipe.py). A checkpoint holds everything the next step depends on
(weights, optimizer, step, RNG states, data position), so an interrupted and resumed run follows the same loss
curve as an uninterrupted one. The loop is meant to be read in one place: its resume, step and save phases stay
in this file, in the order they run.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpmctl import CpmctlError
from cpmctl.progress import StepProgress
from cpmctl.recipe import check_recipe
from cpmctl.model.ant import CPMAnt
from cpmctl.model.checkpoint import fold_factor, save_native
from cpmctl.model.flex_attention import use_attention
from cpmctl.train import checkpointing as ckpt
from cpmctl.train.engine import (
    Engine,
    autocast,
    check_precision,
    clip_gradients,
    compile_model,
    enable_activation_checkpointing,
    gradient_sync,
    grad_scaler,
    memory_mb,
    setup_engine,
    unwrap,
    wrap_model,
)
from cpmctl.train.metrics import MetricsLog, MetricWindow
from cpmctl.train.objectives import lm_loss
from cpmctl.train.plots import plot_loss_curve
from cpmctl.train.recipe import TrainConfig
from cpmctl.train.schedule import lr_factor

ADAM_EPS = 1e-8


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    train_loss: float | None  # mean train loss of the last log window
    valid_loss: float | None  # last validation loss
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl rows of the whole run
    checkpoint: Path | None = None  # the last checkpoint written (its directory is a loadable model)
    tokens: int = 0  # tokens trained on in this call (all ranks)
    seconds: float = 0.0  # wall time of the training steps in this call


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: the loop saved a checkpoint (`checkpoint`, None if it could not) and stopped."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted at step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step, self.checkpoint = step, checkpoint


# ----- optimizer -----------------------------------------------------------------------------------------------
def default_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups over every trainable parameter, weight decay on 2-D weights only (`weight_decay_on:
    matrices`) or on every parameter, norms and the position-bias table included (`all`, the original's single
    optimizer group).

    The model holds folded weights W_f = c * W (c = 1/sqrt(fan_in) for linears, 1/sqrt(dim_model) for embeddings).
    AdamW on W_f with lr*c, eps/c and weight_decay/c takes exactly the steps AdamW takes on the original W with
    lr, eps and weight_decay, so the original's hyperparameters mean the same thing here
    (`original_lr_scaling`, CPM-Ant models only).
    """
    module = unwrap(model)
    config = module.config if isinstance(module, CPMAnt) and cfg.original_lr_scaling else None
    groups: dict[tuple, dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 or cfg.weight_decay_on == "all"
        scale = fold_factor(name, p.shape, config) if config is not None else 1.0
        group = groups.setdefault((decay, scale), {
            "params": [],
            "lr_scale": scale,
            "weight_decay": cfg.weight_decay / scale if decay else 0.0,
            "eps": ADAM_EPS / scale,
        })
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model, cfg: TrainConfig, param_groups, engine: Engine) -> torch.optim.Optimizer:
    """AdamW over the groups. Group keys beyond torch's: `lr_scale` (times train.lr; ignored when the group sets
    `lr`), `scheduled` (False = constant lr), `clip` (False = left out of gradient clipping)."""
    if param_groups is None:
        groups = default_param_groups(model, cfg)
    elif callable(param_groups):
        groups = param_groups(unwrap(model))
    else:
        if engine.kind == "fsdp":
            raise CpmctlError("param_groups: with engine fsdp pass a callable(model) -> groups (FSDP replaces parameters)")
        groups = param_groups
    groups = [dict(g) for g in groups]
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr_scale", 1.0)
        g["base_lr"] = float(g["lr"]) if "lr" in g else cfg.lr * g["lr_scale"]
        g.setdefault("scheduled", True)
        g.setdefault("clip", True)
        g.setdefault("weight_decay", cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise CpmctlError("nothing to train: the model has no parameter with requires_grad")
    # fused AdamW (one kernel for all tensors) on CPU and GPU; FSDP's DTensor parameters use the foreach path.
    fused = engine.kind != "fsdp" and engine.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=ADAM_EPS, fused=fused or None)


def apply_schedule(optimizer, cfg: TrainConfig, step: int) -> float:
    factor = lr_factor(cfg.schedule, step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * (factor if g["scheduled"] else 1.0)
    return cfg.lr * factor


# ----- the loop ------------------------------------------------------------------------------------------------
def train(
    model: torch.nn.Module,
    data,
    cfg: TrainConfig,
    out_dir,
    *,
    valid=None,
    loss_fn: Callable = lm_loss,
    param_groups=None,
    on_step: Callable | None = None,
    save_model: Callable | None = None,
    extra_state=None,
    resume: bool | str | Path = False,
    progress: bool = True,
) -> TrainResult:
    """Train `model` on batches from `data` for `cfg.steps` optimizer steps; checkpoints go to `out_dir`.

    data / valid: sources with next_batch(device) -> dict, state_dict(), load_state_dict(). Under ddp/fsdp each
        rank's source yields its own share (PackedReader(rank=, world_size=)).
    loss_fn(model, batch) -> (loss, metrics): `model` is the wrapped module (call it; `unwrap(model)` for its
        internals). Metrics `loss/<name>` are averaged weighted by `targets/<name>`; others plainly.
    param_groups: a list of AdamW groups, or a callable(model) -> groups (needed with fsdp); see build_optimizer.
    on_step(step, model): before each step's forward passes, with the unwrapped model.
    save_model(model, dir): writes the model part of a checkpoint into dir (default: save_native).
    extra_state: an object with state_dict()/load_state_dict(), saved in and restored from each checkpoint.
    resume: True = continue from out_dir's latest checkpoint (start fresh if there is none); a path = continue
        from that checkpoint directory.
    Raises TrainingInterrupted (a KeyboardInterrupt) after saving a checkpoint on Ctrl-C / SIGTERM, and
    CpmctlError for bad input (data/model mismatch, out of memory with the batch size to lower).
    """
    check_recipe(cfg, "train")  # a TrainConfig built in Python gets the checks a loaded recipe had
    out_dir = Path(out_dir)
    engine = setup_engine(cfg.engine, cfg.device)
    try:
        check_precision(cfg.precision, engine.device)
        check_data(model, data, "training data")
        if valid is not None:
            check_data(model, valid, "validation data")
        return _run(model, data, cfg, out_dir, engine, valid=valid, loss_fn=loss_fn, param_groups=param_groups,
                    on_step=on_step, save_model=save_model or _save_native, extra_state=extra_state, resume=resume,
                    progress=progress)
    finally:
        engine.close()


def _save_native(model, directory: Path) -> None:
    save_native(model, directory)


def _run(model, data, cfg, out_dir, engine, *, valid, loss_fn, param_groups, on_step, save_model, extra_state,
         resume, progress) -> TrainResult:
    # ----- where to start ----------------------------------------------------------------------------------------
    resume_from = _resume_path(out_dir, resume)
    if resume_from is None and ckpt.list_checkpoints(out_dir) and not resume:
        raise CpmctlError(f"{out_dir}: holds checkpoints of an earlier run; resume it (resume=true / --resume) "
                          "or choose another out_dir")
    state = ckpt.read_state(resume_from) if resume_from is not None else None
    if state is not None:
        ckpt.check_compatible(resume_from, state, engine)
        if not state["sharded"]:
            ckpt.restore_params(unwrap(model), resume_from)
    else:
        _seed_everything(cfg.seed + engine.rank)

    # ----- model, optimizer, precision ---------------------------------------------------------------------------
    if engine.kind == "fsdp":
        ckpt.keep_skeleton(model)  # the model's structure, to rebuild a full copy of the shards for saving
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    use_attention(model, cfg.attention)  # train.attention (model/flex_attention.py), before compile traces it
    if cfg.compile:
        compile_model(model, cfg.engine)
    model = wrap_model(model, engine)
    model.train()
    optimizer = build_optimizer(model, cfg, param_groups, engine)
    clipped = [p for g in optimizer.param_groups if g["clip"] for p in g["params"]]
    replicated = ckpt.outside_params(unwrap(model), optimizer)
    scaler = grad_scaler(cfg.precision, engine.device)
    amp = lambda: autocast(cfg.precision, engine.device)  # noqa: E731
    window = MetricWindow()
    step = 0
    if state is not None:
        ckpt.restore_optimizer_and_shards(model, optimizer, engine, resume_from, state)
        mine = state["ranks"][engine.rank]
        data.load_state_dict(mine["data"])
        window.load_state_dict(mine["window"])
        window.tokens = 0.0  # throughput restarts with the clock
        if extra_state is not None and state.get("extra") is not None:
            extra_state.load_state_dict(state["extra"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        ckpt.restore_rng(mine["rng"], engine.device)
    log = MetricsLog(out_dir / "metrics.jsonl", write=engine.is_main, resume_step=step if state else None,
                     logger=cfg.logger)
    valid_start = copy.deepcopy(valid.state_dict()) if valid is not None else None
    last_saved = resume_from if state is not None else None
    last_train, last_valid = None, None
    run_tokens, run_seconds, window_seconds = 0.0, 0.0, 0.0

    def save(at_step: int, rank_state: dict | None = None) -> Path:
        shared = {"step": at_step, "config": dataclasses.asdict(cfg), "format_version": 1,
                  "extra": extra_state.state_dict() if extra_state is not None else None,
                  "scaler": scaler.state_dict() if scaler is not None else None}
        if rank_state is None:
            rank_state = {"rng": ckpt.capture_rng(engine.device), "data": data.state_dict(),
                          "window": window.state_dict()}
        final = at_step >= cfg.steps
        path = ckpt.save_checkpoint(
            out_dir, at_step, model=model, optimizer=optimizer, engine=engine, state=shared, rank_state=rank_state,
            save_model=save_model, sharded=cfg.checkpoint_format == "sharded",
            include_model=cfg.checkpoint_format == "full" or final, keep_last=cfg.keep_last)
        if engine.is_main:
            plot_loss_curve(log.rows, out_dir / "loss_curve.png")
        return path

    if step >= cfg.steps:  # resumed a finished run
        log.close()
        return TrainResult(step, None, None, log.rows, resume_from)

    bar = StepProgress(cfg.steps, step, enabled=progress and engine.is_main, log_every=cfg.log_every)
    phase = "idle"  # idle | step (forward/backward: nothing applied yet) | update | save
    snapshot = None
    try:
        with _StopOnSignal() as stop, bar:
            while step < cfg.steps:
                if engine.any_rank(stop.requested):
                    phase = "save"
                    path = last_saved if last_saved is not None and _step_of(last_saved) == step else save(step)
                    raise TrainingInterrupted(step, path)
                # What the checkpoint needs if this step is interrupted before it changes anything.
                snapshot = {"rng": ckpt.capture_rng(engine.device), "data": copy.deepcopy(data.state_dict()),
                            "window": window.state_dict()}
                phase = "step"
                started = time.perf_counter()
                lr = apply_schedule(optimizer, cfg, step + 1)
                if on_step is not None:
                    on_step(step + 1, unwrap(model))
                step_loss, tokens = _forward_backward(model, data, cfg, engine, loss_fn, scaler, amp, window)
                engine.average_gradients(replicated)  # tensors outside the wrapped model: gates, multipliers
                if not np.isfinite(step_loss) and scaler is None:
                    raise CpmctlError(f"loss is {step_loss} at step {step + 1}: training diverged; lower train.lr "
                                      "or resume from an earlier checkpoint", exit_code=1)
                phase = "update"
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = clip_gradients(clipped, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                phase = "idle"
                seconds = time.perf_counter() - started
                window.add({"loss": step_loss, "grad_norm": grad_norm}, tokens)
                window_seconds += seconds
                run_seconds += seconds
                run_tokens += tokens * engine.world_size
                bar.advance(step_loss, tokens * engine.world_size / max(seconds, 1e-9), lr)

                if step % cfg.log_every == 0 or step == cfg.steps:
                    means, window_tokens = window.summarize(engine)
                    row = {"step": step, "loss": means.pop("loss", float("nan")), "lr": lr,
                           "grad_norm": means.pop("grad_norm", 0.0),
                           "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                           "memory_mb": round(memory_mb(engine.device), 1), **means}
                    if scaler is not None:
                        row["loss_scale"] = scaler.get_scale()
                    log.write(row)
                    last_train, window_seconds = row["loss"], 0.0
                if valid is not None and cfg.valid_batches > 0 and (step % cfg.valid_every == 0 or step == cfg.steps):
                    row = evaluate(model, valid, loss_fn, cfg.valid_batches, engine, amp, valid_start)
                    log.write({"step": step, **row})
                    last_valid = row["valid_loss"]
                if step % cfg.save_every == 0 or step == cfg.steps:
                    phase = "save"
                    last_saved = save(step)
                    phase = "idle"
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        # Raised inside a step (a second Ctrl-C, or by a callback). Save only a consistent state: before the
        # optimizer update nothing has changed yet, so the snapshot from the step's start is the state to keep.
        if engine.distributed or phase in ("update", "save"):
            raise TrainingInterrupted(step, last_saved) from None
        rank_state = snapshot if phase == "step" else None
        optimizer.zero_grad(set_to_none=True)
        if rank_state is not None:
            data.load_state_dict(rank_state["data"])
        path = last_saved if last_saved is not None and _step_of(last_saved) == step else save(step, rank_state)
        raise TrainingInterrupted(step, path) from None
    except torch.OutOfMemoryError:
        raise CpmctlError(_oom_message(cfg, engine), exit_code=1) from None
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
            raise CpmctlError(_oom_message(cfg, engine), exit_code=1) from None
        raise
    finally:
        log.close()  # the tracker flushes its events

    return TrainResult(step, last_train, last_valid, log.rows, last_saved, int(run_tokens), run_seconds)


def _forward_backward(model, data, cfg, engine, loss_fn, scaler, amp, window) -> tuple[float, float]:
    """grad_accum micro-batches: the mean loss over them and the tokens seen (this rank)."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = 0.0
    for micro in range(cfg.grad_accum):
        batch = data.next_batch(engine.device)
        with gradient_sync(model, engine, enabled=micro == cfg.grad_accum - 1):
            with amp():
                loss, metrics = loss_fn(model, batch)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().double()
        window.add({k: v for k, v in metrics.items() if k != "loss"}, 0.0)
        tokens += _count_tokens(batch)
    return float(total) / cfg.grad_accum, tokens


@torch.no_grad()
def evaluate(model, valid, loss_fn, batches: int, engine: Engine, amp, start_state: dict | None = None) -> dict:
    """Validation loss over `batches` batches (token-weighted), the same batches every time (the source is rewound
    to `start_state`). Returns {"valid_loss", "valid_loss/lm", ...}."""
    if start_state is not None:
        valid.load_state_dict(copy.deepcopy(start_state))
    was_training = model.training
    model.eval()
    window = MetricWindow()
    try:
        for _ in range(batches):
            batch = valid.next_batch(engine.device)
            with amp():
                loss, metrics = loss_fn(model, batch)
            window.add({**metrics, "loss/all": float(loss), "targets/all": metrics.get("targets", 1.0)}, 0.0)
    finally:
        model.train(was_training)
    means, _ = window.summarize(engine)
    row = {"valid_loss": means.pop("loss/all")}
    row.update({f"valid_{k}": v for k, v in means.items()})
    return row


# ----- helpers -------------------------------------------------------------------------------------------------
def check_data(model, source, what: str) -> None:
    """Catch a data / model mismatch before step 1: the packed vocabulary must be the model's."""
    module = unwrap(model)
    dataset = getattr(source, "dataset", None)
    config = getattr(module, "config", None)
    if dataset is not None and config is not None and hasattr(dataset, "check_vocab"):
        dataset.check_vocab(config.vocab_size, what=f"model ({what})")


def _count_tokens(batch: dict) -> float:
    if "task" in batch:
        return float((batch["task"] >= 0).sum())
    return float(batch["input"].numel())


def _resume_path(out_dir: Path, resume) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        return ckpt.latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / ckpt.STATE_FILE).exists():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise CpmctlError(f"resume: {path} is not a training checkpoint and holds none")
    return latest


def _step_of(path: Path) -> int:
    return int(Path(path).name.split("-")[-1])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _oom_message(cfg: TrainConfig, engine: Engine) -> str:
    return (f"out of memory on {engine.device} at train.batch_size={cfg.batch_size}: lower train.batch_size "
            f"(raise train.grad_accum to keep the global batch of {cfg.batch_size * cfg.grad_accum * engine.world_size}"
            " rows) or set train.activation_checkpointing=true")


class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step and save; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
