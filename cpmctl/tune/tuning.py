"""`cpmctl tune lora` core: LoRA delta tuning of a CPM-Ant model on a task with the shared training loop.

The run, in order: read and check the task data (train and dev splits) and the model config, load the model and
inject LoRA (everything else frozen), turn the train split into packed rows, and hand them to `train()`. At each
epoch boundary the dev split is decoded or scored with the task's own metric; an improvement saves the adapter to
OUT/best, and `tune.patience` epochs without one stop the run. Each training checkpoint (OUT/step-XXXXXXX) holds the
adapter of that step plus the trainer state, so `--resume` continues exactly; the epoch tracker travels in the
checkpoints as the loop's `extra_state`.

Files in OUT: best/ (the adapter to use), step-*/ (checkpoints), metrics.jsonl and loss_curve.png (the loop's),
dev.jsonl (one line per evaluated epoch), tune_result.json (the summary, written when the run ends). The recipe
(TuneRecipe) and `load_tune_recipe` are in tune/recipe.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cpmctl import CpmctlError
from cpmctl.device import torch_dtype
from cpmctl.io import atomic_file
from cpmctl.model.generation_config import overrides_of
from cpmctl.model.lora import adapter_meta, adapter_state_dict, write_adapter, write_adapter_files
from cpmctl.recipe import check_recipe
from cpmctl.train.recipe import TrainConfig
from cpmctl.tune.recipe import TuneRecipe

BEST_DIR = "best"
DEV_LOG = "dev.jsonl"
RESULT_FILE = "tune_result.json"


# ----- metrics -------------------------------------------------------------------------------------------------
_GENERATION_KEYS = {"rouge": ["rouge-l", "rouge-1", "rouge-2"], "bleu": ["bleu-4", "bleu-1", "bleu-2", "bleu-3"],
                    "distinct": ["distinct-2", "distinct-1"], "math": ["accuracy"], "exact_match": ["exact_match"],
                    "char_f1": ["char_f1"]}


def metric_names(task) -> list[str]:
    """The dev scores a task reports that can pick the best adapter (higher is better), primary first."""
    if task.kind == "choice":
        return ["accuracy"] + (["macro_f1"] if "macro_f1" in task.metrics else [])
    if task.kind == "ranking":
        return ["mrr"] + [f"ndcg@{k}" for k in task.ks]
    return [name for m in task.metrics for name in _GENERATION_KEYS.get(m, [])]


def resolve_metric(task, requested: str | None) -> str:
    names = metric_names(task)
    if requested is None:
        return names[0]
    if requested not in names:
        raise CpmctlError(f"tune.metric: task {task.name} reports {', '.join(names)}, not '{requested}'")
    return requested


# ----- the epoch tracker (dev evaluation, best adapter, early stopping) ----------------------------------------
class EarlyStop(Exception):
    """Raised from the step callback when the dev metric stopped improving: ends the run (not an error)."""


@dataclass
class EpochTracker:
    """Dev evaluation at epoch ends. Its state rides in the loop's checkpoints (`extra_state`), so a resumed run
    knows its best score and patience."""

    evaluate: Callable  # (model) -> dict of dev scores
    save_best: Callable  # (model, row) -> None
    metric: str
    patience: int
    history: list = field(default_factory=list)
    best: dict | None = None
    bad_epochs: int = 0
    stopped: bool = False
    log: Callable = print
    on_history: Callable | None = None  # (history) -> None, e.g. rewrite dev.jsonl

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best = list(state["history"]), state["best"]
        self.bad_epochs, self.stopped = int(state["bad_epochs"]), bool(state["stopped"])

    def evaluated(self, epoch: int) -> bool:
        return any(row["epoch"] == epoch for row in self.history)

    def end_epoch(self, epoch: int | float, step: int, model, final: bool = False) -> None:
        if self.evaluated(epoch):
            return  # a resumed run passes the same boundary again
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = self.evaluate(model)
        finally:
            model.train(was_training)
        score = scores[self.metric]
        row = {"epoch": epoch, "step": step, "score": score, "metrics": scores}
        self.history.append(row)
        improved = self.best is None or score > self.best["score"]
        if improved:
            self.best, self.bad_epochs = {"epoch": epoch, "step": step, "score": score}, 0
            self.save_best(model, row)
        else:
            self.bad_epochs += 1
        self.log(f"epoch {epoch} (step {step}): dev {self.metric} {score:.3f}"
                 + (" (best)" if improved else f", best {self.best['score']:.3f} at epoch {self.best['epoch']}"))
        if self.on_history is not None:
            self.on_history(self.history)
        if not final and not improved and self.patience and self.bad_epochs >= self.patience:
            self.stopped = True
            self.log(f"early stop: no better dev {self.metric} for {self.bad_epochs} epochs")
            raise EarlyStop()


# ----- dry run -------------------------------------------------------------------------------------------------
def tune_dry_run(model: str | None, recipe: TuneRecipe, nproc: int | None = None,
                 device_memory_gb: float | None = None) -> dict:
    """Trainable and total parameters from the model's config alone (no weights are read), and the per-rank memory
    plan (train/memory_plan.py) at the task's row length (DEFAULT_SEQ_LEN without a task)."""
    from cpmctl.model.checkpoint import weight_files
    from cpmctl.model.lora import base_config, dry_run_counts
    from cpmctl.train.memory_plan import (DEFAULT_SEQ_LEN, PRECISION_BYTES, checkpoint_bytes_per_param,
                                          plan_recipe_phase, verdict)

    if model is None:
        raise CpmctlError("--model is required: a checkpoint, a config JSON or a ladder name (10b)")
    config = base_config(model)
    counts = dry_run_counts(config, recipe.lora)
    seq_len = (recipe.task.max_length or _resolve_task(recipe).max_length) if recipe.task.name else DEFAULT_SEQ_LEN
    base = counts["total"] - counts["trainable"]
    is_file = Path(model).exists() and not str(model).endswith(".json")
    on_disk = checkpoint_bytes_per_param(weight_files(model), base) if is_file else (2 if config.half else 4)
    plan, smallest = plan_recipe_phase(
        config, recipe.train, seq_len=seq_len, nproc=nproc, device_memory_gb=device_memory_gb,
        checkpoint_bytes=on_disk, trained="lora", base_dtype_bytes=PRECISION_BYTES[recipe.tune.base_dtype],
        lora_r=recipe.lora.r, lora_targets=tuple(recipe.lora.targets), lora_trainable=counts["trainable"])
    return {"model": str(model), "r": recipe.lora.r, "alpha": recipe.lora.alpha, "scaling": recipe.lora.scaling,
            "targets": list(recipe.lora.targets), "rslora": recipe.lora.rslora, "dora": recipe.lora.dora,
            "frozen": base, **counts, "seq_len": seq_len,
            "memory": {"plan": plan.to_dict(), "verdict": verdict([plan], smallest, plan.engine)}}


# ----- the run -------------------------------------------------------------------------------------------------
def _resolve_task(recipe: TuneRecipe):
    from cpmctl.tasks import get_task

    if recipe.task.name is None:
        raise CpmctlError("--task is required (ccpm, c3, sogou-log, lcsts, kdconv, math23k, or custom)")
    task = get_task(recipe.task.name, recipe.task.definition, recipe.task.template)
    if recipe.task.max_length is not None:
        task = dataclasses.replace(task, max_length=recipe.task.max_length)
    return task


def _load_splits(task, data: Path, dev_limit: int | None):
    if not data.is_dir():
        raise CpmctlError(f"--data {data}: expected a directory with train.jsonl and dev.jsonl (test.jsonl for eval)")
    train_examples = task.load_split(data, "train")
    dev_examples = task.load_split(data, "dev")
    return train_examples, dev_examples[:dev_limit] if dev_limit else dev_examples


def _lora_param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW on the LoRA weights with plain lr (they are not folded, as in OpenDelta), decay on matrices only."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # DoRA magnitudes
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    return groups


def _write_json(path: Path, obj) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_dev_log(path: Path, history: list) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        for row in history:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _last_train_loss(out_dir: Path) -> float | None:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return None
    losses = [row["loss"] for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "loss" in row]
    return losses[-1] if losses else None


@dataclass
class LoraRun:
    """A prepared tuning run: the LoRA model, its data, the loop settings and the epoch tracker. `fit()` trains."""

    task: object
    model: torch.nn.Module
    reader: object
    valid: object
    cfg: TrainConfig
    recipe: TuneRecipe
    tracker: EpochTracker
    out_dir: Path
    steps_per_epoch: int
    counts: dict
    meta: dict
    info: dict  # model, data: for the summary
    resume: bool = False
    is_main: bool = True

    def on_step(self, step: int, model) -> None:
        """Before step `step`: if the previous step ended an epoch, score the dev split (may stop the run)."""
        if step > 1 and (step - 1) % self.steps_per_epoch == 0:
            self.tracker.end_epoch((step - 1) // self.steps_per_epoch, step - 1, model)

    def save_model(self, model, directory: Path) -> None:
        """The model part of each training checkpoint: the adapter (a step directory is a loadable adapter)."""
        write_adapter_files(Path(directory), adapter_state_dict(model), self.recipe.lora, self.meta,
                            base_model=self.info["model"])

    def fit(self, progress: bool = True) -> dict:
        from cpmctl.train.loop import train

        stopped_early, result = False, None
        try:
            result = train(self.model, self.reader, self.cfg, self.out_dir, valid=self.valid,
                           param_groups=lambda m: _lora_param_groups(m, self.cfg), on_step=self.on_step,
                           save_model=self.save_model, extra_state=self.tracker, resume=self.resume,
                           progress=progress)
            # The last epoch ends with the run (a run of train.steps may end inside an epoch: a fractional epoch).
            whole, rest = divmod(result.steps, self.steps_per_epoch)
            epoch = whole if rest == 0 else round(result.steps / self.steps_per_epoch, 3)
            self.tracker.end_epoch(epoch, result.steps, self.model, final=True)
        except EarlyStop:
            stopped_early = True
        last = self.tracker.history[-1] if self.tracker.history else None
        summary = {
            "task": self.task.name,
            **self.info,
            "out": str(self.out_dir),
            "adapter": str(self.out_dir / BEST_DIR),
            "metric": self.tracker.metric,
            "best": self.tracker.best,
            "epochs": last["epoch"] if last else 0,
            "steps": last["step"] if last else (result.steps if result else 0),
            "steps_per_epoch": self.steps_per_epoch,
            "stopped_early": stopped_early,
            "trainable": self.counts["trainable"],
            "total": self.counts["total"],
            "train_loss": _last_train_loss(self.out_dir),
            "history": self.tracker.history,
        }
        if self.is_main:
            _write_json(self.out_dir / RESULT_FILE, summary)
        return summary


def _earlier_tune(path: Path) -> bool:
    """A run directory of a cpmctl older than the output markers."""
    return (path / RESULT_FILE).exists() or (path / DEV_LOG).exists() or (path / "latest").exists()


def tune_lora(model_path: str | Path | None, data: str | Path | None, out_dir: str | Path | None, recipe: TuneRecipe,
              vocab: str | Path | None = None, resume: bool = False, log: Callable = print,
              progress: bool = True, force: bool = False) -> dict:
    """Tune LoRA on `recipe.task` and keep the best adapter (by the dev metric) in OUT/best. Returns a summary.
    OUT follows the output policy (cpmctl/outputs.py): locked for the run; `force` runs anew beside it."""
    from cpmctl.train.engine import engine_for_world, setup_engine

    if out_dir is None:
        raise CpmctlError("--out is required")
    if force and resume:
        raise CpmctlError("--force starts a new run (it replaces --out once complete); it does not go with --resume")
    recipe.train.engine = engine_for_world(recipe.train.engine)
    if recipe.train.engine == "single":
        return _tune_lora(model_path, data, out_dir, recipe, vocab, resume, log, progress, force)
    if force:
        raise CpmctlError("--force with several processes: remove --out first, or choose a new one")
    # One process group for the whole run: the dev scoring after the last step still runs on the sharded model.
    engine = setup_engine(recipe.train.engine, recipe.train.device)
    try:
        return _tune_lora(model_path, data, out_dir, recipe, vocab, resume, log if engine.is_main else _quiet,
                          progress, force)
    finally:
        engine.close()


def _quiet(*args, **kw) -> None:
    pass


def _tune_lora(model_path, data, out_dir, recipe: TuneRecipe, vocab, resume: bool, log: Callable, progress: bool,
               force: bool) -> dict:
    from cpmctl.outputs import run_dir
    from cpmctl.train.engine import dist_env
    from cpmctl.train.loop import TrainingInterrupted

    with run_dir(out_dir, "tune lora", force=force, inputs=[model_path, data, vocab], accept=_earlier_tune,
                 writer=dist_env()[0] == 0) as rd:
        finished = rd.work / RESULT_FILE
        if resume and finished.exists():
            log(f"{out_dir}: the run has already finished ({RESULT_FILE})")
            return json.loads(finished.read_text(encoding="utf-8"))
        try:
            summary = prepare_run(model_path, data, rd.work, recipe, vocab=vocab, resume=resume, log=log).fit(progress)
        except TrainingInterrupted as e:
            if rd.temp:
                raise rd.discarded(e.step) from None
            raise
        if rd.temp:
            _write_json(rd.work / RESULT_FILE, rd.rebase(summary))
        rd.commit()
    return rd.rebase(summary)


def prepare_run(model_path: str | Path | None, data: str | Path | None, out_dir: str | Path | None,
                recipe: TuneRecipe, vocab: str | Path | None = None, resume: bool = False,
                log: Callable = print) -> LoraRun:
    """Check the inputs (data and config before any weight is read), load the model, inject LoRA, build the rows."""
    from cpmctl.model.checkpoint import load_model, load_tokenizer, read_config
    from cpmctl.train import checkpointing as ckpt
    from cpmctl.train.checkpointing import full_copy
    from cpmctl.train.engine import Engine, dist_env
    from cpmctl.model.lora import init_lora_weights, inject_lora, lora_initial_value, parameter_counts
    from cpmctl.data.packed_format import PackedReader, RowsInMemory
    from cpmctl.evaluate.predict import predict

    for value, flag in ((model_path, "--model"), (data, "--data"), (out_dir, "--out")):
        if value is None:
            raise CpmctlError(f"{flag} is required")
    check_recipe(recipe)
    out_dir, data = Path(out_dir), Path(data)
    task = _resolve_task(recipe)
    metric = resolve_metric(task, recipe.tune.metric)
    if not resume and (ckpt.list_checkpoints(out_dir) or (out_dir / RESULT_FILE).exists()):
        raise CpmctlError(f"{out_dir}: holds an earlier tuning run; add --resume to continue it, or choose another "
                          "--out")

    train_examples, dev_examples = _load_splits(task, data, recipe.tune.dev_limit)
    config, _ = read_config(model_path)
    tokenizer = load_tokenizer(model_path, vocab, config.vocab_size)

    cfg = recipe.train
    rank, _, world = dist_env()
    rows = task.to_rows(train_examples, tokenizer, task.max_length, config.vocab_size, recipe.task.pack)
    steps_per_epoch = len(rows) // (cfg.batch_size * world * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise CpmctlError(f"{data / 'train.jsonl'}: {len(rows)} training rows is fewer than one step of "
                          f"{cfg.batch_size} x {cfg.grad_accum} accumulation x {world} processes; "
                          "lower train.batch_size")
    if recipe.tune.epochs is not None:
        cfg = dataclasses.replace(cfg, steps=recipe.tune.epochs * steps_per_epoch)
    reader = PackedReader(RowsInMemory(rows, f"{data}/train.jsonl"), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    valid = None
    dev_rows = task.to_rows(dev_examples, tokenizer, task.max_length, config.vocab_size, recipe.task.pack)
    if cfg.valid_batches > 0 and len(dev_rows) >= world:
        valid = PackedReader(RowsInMemory(dev_rows, f"{data}/dev.jsonl"), min(cfg.batch_size, len(dev_rows) // world),
                             seed=cfg.seed, rank=rank, world_size=world, shuffle=False)

    # Frozen base weights (fp32 or bf16), fp32 LoRA weights, started from cfg.seed (init_lora_weights).
    def add_lora(m) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # peft's own draws (replaced below): kept off the global generator
            inject_lora(m, recipe.lora, base_model=str(model_path))
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    base_dtype = torch_dtype(recipe.tune.base_dtype)
    if cfg.engine == "fsdp" and not recipe.lora.dora:  # each rank builds only its shards (train/sharded_start.py)
        from cpmctl.device import resolve_device
        from cpmctl.train.sharded_start import load_sharded

        generator = torch.Generator().manual_seed(cfg.seed)
        model, _ = load_sharded(model_path, resolve_device(cfg.device, dist_env()[1], what="train.device"),
                                dtype=base_dtype, prepare=add_lora,
                                extra=lambda name, shape: lora_initial_value(name, shape, generator))
    else:
        model, _ = load_model(model_path, dtype=base_dtype)
        add_lora(model)
        init_lora_weights(model, cfg.seed)
    counts = parameter_counts(model)
    log(f"LoRA r {recipe.lora.r}, alpha {recipe.lora.alpha:g} on {', '.join(recipe.lora.targets)}: "
        f"{counts['trainable']:,} trainable of {counts['total']:,} parameters ({counts['trainable_percent']:.3f}%)")
    log(f"task {task.name}: {len(train_examples)} train examples in {len(rows)} rows, {len(dev_examples)} dev; "
        f"{steps_per_epoch} steps per epoch, {cfg.steps} steps")

    meta = adapter_meta(config, task=task.name, model=str(model_path))
    is_main = rank == 0
    decode = overrides_of(recipe.decode)

    def evaluate(m) -> dict:
        predictions = predict(task, m, tokenizer, dev_examples, batch_size=recipe.tune.eval_batch_size, **decode)
        return task.score(predictions, dev_examples)

    def save_best(m, row) -> None:
        whole = full_copy(m, Engine(cfg.engine, torch.device("cpu"), rank=rank, world_size=world))  # collective
        if is_main:
            write_adapter(out_dir / BEST_DIR, adapter_state_dict(whole), recipe.lora,
                          {**meta, "epoch": row["epoch"], "step": row["step"], "metric": metric, "dev": row["metrics"]},
                          base_model=str(model_path), replace=True)

    tracker = EpochTracker(evaluate, save_best, metric, recipe.tune.patience, log=log,
                           on_history=(lambda h: _write_dev_log(out_dir / DEV_LOG, h)) if is_main else None)
    return LoraRun(task, model, reader, valid, cfg, recipe, tracker, out_dir, steps_per_epoch, counts, meta,
                   {"model": str(model_path), "data": str(data)}, resume=resume, is_main=is_main)
