"""The pruning stage runner: `cpmctl prune` as a library call.

Each stage (e.g. mini-10b -> mini-7b) runs in its own directory under the output directory:

    stage-1-mini-10b-to-mini-7b/
        mask/         the mask phase: hard-concrete gates and the weights trained jointly by the shared training
                      loop under LM loss (+ optional logit distillation) + Lagrangian; checkpoints, metrics.jsonl
        extracted/    the model cut to the exact target shape (native format) + selection.pt + extraction.json
        recovery/     recovery training of the extracted model (the shared loop again)
        model/        the stage's output, native format (the next stage's input)
        original/     the same in the original format (model.pt + model.json, mask_modules listing dropped blocks)
        survivors.png which layers and heads survived
        report.json   kept structures and the losses; written last: a stage with a report is finished

Rerunning the same command skips finished stages, resumes an interrupted mask phase or recovery from its latest
checkpoint, and starts extraction again from the finished mask phase (extraction is deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedReader
from cpmctl.io import atomic_file
from cpmctl.model.ant import CPMAnt
from cpmctl.model.checkpoint import VOCAB_FILE, find_vocab, load_model, read_config, save_native, save_original, vocab_beside
from cpmctl.model.config import CPMAntConfig
from cpmctl.prune.baselines import activation_selection, magnitude_selection, random_selection
from cpmctl.prune.extract import extract
from cpmctl.prune.gates import Selection, clear_gates
from cpmctl.prune.importance import calibration_batches, importance_scores
from cpmctl.prune.mask_phase import MaskPhase, distilled_objective
from cpmctl.prune.recipe import PruneRecipe
from cpmctl.prune.stage_data import StageData, open_data, train_reader, valid_reader, validation_loss
from cpmctl.prune.report import kept_summary, plot_survivors
from cpmctl.prune.targets import Shape, Stage, check_checkpoint_shape, plan_stages, plan_summary
from cpmctl.device import resolve_device
from cpmctl.train.checkpointing import full_copy
from cpmctl.train.engine import Engine, engine_for_world, setup_engine, shard_frozen
from cpmctl.train.engine import is_sharded
from cpmctl.train.sharded_start import load_sharded
from cpmctl.outputs import run_dir
from cpmctl.train.loop import TrainConfig, TrainingInterrupted, train
from cpmctl.train.objectives import lm_loss


# ----- one stage -----------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    recipe: PruneRecipe
    data: StageData
    vocab: Path | None
    progress: bool = True
    log: Callable[[str], None] = print
    rebase: Callable = lambda value: value  # paths in the work directory -> paths in --out (a --force run)
    engine: Engine | None = None  # the process group of a distributed run (ddp / fsdp); None: one process

    @property
    def is_main(self) -> bool:
        return self.engine is None or self.engine.is_main

    def barrier(self) -> None:
        if self.engine is not None:
            self.engine.barrier()

    def device(self, cfg: TrainConfig, at: str):
        return self.engine.device if self.engine is not None else resolve_device(cfg.device, what=f"{at}.device")

    def phase_engine(self, cfg: TrainConfig) -> Engine | None:
        """The process group with the phase's engine kind (ddp or fsdp); None in one process."""
        return None if self.engine is None else dataclasses.replace(self.engine, kind=cfg.engine, owns_process_group=False)

    def log_main(self, message: str) -> None:
        if self.is_main:
            self.log(message)


def _save_model_fn(vocab: Path | None):
    def save(model, directory: Path) -> None:
        save_native(model, directory, vocab=vocab)

    return save


def load_for(path: Path, engine: Engine | None, device, frozen: bool = False) -> CPMAnt:
    """A model for a phase: under fsdp straight into this rank's shards (train/sharded_start.py: no rank holds the
    whole model), otherwise whole on the device. `frozen`: a distillation teacher (no gradients)."""
    if engine is not None and engine.kind == "fsdp":
        model, _ = load_sharded(path, engine.device)
    else:
        model, _ = load_model(path, device=device)
    if frozen:
        model.requires_grad_(False)
    return model


def learn_selection(stage: Stage, model: CPMAnt, source_path: Path, stage_dir: Path, ctx: StageContext) -> dict:
    """The mask phase: train gates and weights jointly; returns the selection and what it learned."""
    recipe = ctx.recipe
    device = ctx.device(recipe.mask, "mask")
    engine = ctx.phase_engine(recipe.mask)
    teacher = None
    if recipe.distill.weight > 0:
        teacher = load_for(source_path, engine, device, frozen=True)  # fsdp: sharded like the student
    # Gates and multipliers are replicated: the same seeded start and noise on every rank, gradients averaged.
    phase = MaskPhase(stage, model.config, recipe, teacher).to(device)
    if recipe.gates.init == "activation":  # start the gates in the order of the importance the recipe asks for
        scores = importance_scores(model, stage.kinds, _calibration(stage, ctx), stage.target_counts(),
                                   **dataclasses.asdict(recipe.importance))
        phase.masks.init_from_scores(scores, recipe.gates.init_mean, recipe.gates.init_spread)
    model.to(device)
    frozen = not recipe.gates.train_weights  # one process only: checked by run_prune before any stage
    if frozen:
        model.requires_grad_(False)  # no weight gradients at all: the gates learn against the weights as they are
    ctx.log_main(f"stage {stage.index}: mask phase ({recipe.mask.steps} steps; gates on {', '.join(stage.kinds)}"
                 + ("; weights frozen" if frozen else "") + f"; engine {recipe.mask.engine}"
                 + (f" x {engine.world_size})" if engine is not None else ")"))
    try:
        result = train(model, train_reader(ctx.data.train, recipe.mask, engine), recipe.mask, stage_dir / "mask",
                       loss_fn=phase.loss, param_groups=lambda m: phase.param_groups(m, recipe), on_step=phase.on_step,
                       save_model=_save_model_fn(ctx.vocab), extra_state=phase, resume=True, progress=ctx.progress)
    finally:
        if frozen:
            model.requires_grad_(True)
    clear_gates(model)
    if engine is not None:
        model = full_copy(model, engine)  # rank 0: the trained weights gathered from the shards; others: None
        del teacher
    expected = {k: float(v.detach().mean()) * phase.masks.totals()[k]
                for k, v in phase.masks.expected_fractions().items()}
    return {"selection": phase.masks.select(phase.targets), "mask_steps": result.steps, "expected_kept": expected,
            "lambdas": phase.lagrangian.lambdas.detach().cpu().tolist(), "model": model}


def choose_selection(stage: Stage, model: CPMAnt, source_path: Path, stage_dir: Path, ctx: StageContext) -> dict:
    recipe = ctx.recipe
    if recipe.method == "learned":
        return learn_selection(stage, model, source_path, stage_dir, ctx)
    if recipe.method == "random":
        return {"selection": random_selection(model, stage.kinds, stage.target_counts(), seed=recipe.seed + stage.index)}
    if recipe.method == "activation":
        return {"selection": activation_selection(model, stage.kinds, stage.target_counts(), _calibration(stage, ctx),
                                                  **dataclasses.asdict(recipe.importance))}
    return {"selection": magnitude_selection(model, stage.kinds, stage.target_counts())}


def _calibration(stage: Stage, ctx: StageContext) -> list[dict]:
    """The activation importance's calibration batches: training rows in an order seeded by (seed, stage)."""
    recipe = ctx.recipe
    return calibration_batches(ctx.data.train, recipe.recovery.batch_size, recipe.data.calibration_batches,
                               seed=recipe.seed * 1_000_003 + stage.index)


@torch.no_grad()
def extraction_gap(model: CPMAnt, pruned: CPMAnt, selection: Selection, batch: dict) -> float:
    """Max |logit difference| between the deterministic masked model and the extracted one on a batch."""
    device = pruned.input_embedding.weight.device
    args = [batch[k].to(device) for k in ("input", "segment", "context", "span")]
    model.to(device).eval()
    selection.apply(model)
    masked = model(*args)
    clear_gates(model)
    return float((pruned.eval()(*args) - masked).abs().max())


def run_stage(stage: Stage, source_path: Path, stage_dir: Path, ctx: StageContext) -> dict:
    """Run (or finish) one stage; returns its report. In a distributed run every rank trains its share; rank 0
    alone extracts, evaluates and writes (the others wait at a barrier and read what it wrote)."""
    report_path = stage_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report["status"] = "skipped (finished earlier)"
        return report
    started = time.perf_counter()
    extracted_dir = stage_dir / "extracted"
    if not (extracted_dir / "selection.pt").exists():
        select_and_extract(stage, source_path, extracted_dir, stage_dir, ctx)
    ctx.barrier()
    info = json.loads((extracted_dir / "extraction.json").read_text(encoding="utf-8"))
    selection = Selection.from_state_dict(torch.load(extracted_dir / "selection.pt", weights_only=True))
    recovered, steps = recover(stage, extracted_dir, stage_dir, ctx, source_path)
    if ctx.is_main:
        write_stage_outputs(stage, recovered, selection, info, steps, stage_dir, ctx, time.perf_counter() - started)
    ctx.barrier()
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report["status"] = "done"
    return report


def select_and_extract(stage: Stage, source_path: Path, extracted_dir: Path, stage_dir: Path, ctx: StageContext) -> None:
    """The mask phase (or a baseline's selection), then the exact cut to the target shape, saved with
    selection.pt: that file inside the atomically written directory marks the two as done."""
    recipe = ctx.recipe
    eval_batch, eval_n = recipe.recovery.batch_size, recipe.data.eval_batches
    device = ctx.device(recipe.recovery, "recovery")
    if recipe.method != "learned" and not ctx.is_main:
        return  # a selection without training: rank 0 alone computes it and extracts (run_stage's barrier waits)
    mask_engine = ctx.phase_engine(recipe.mask) if recipe.method == "learned" else None
    model = load_for(source_path, mask_engine, device)
    sharded = is_sharded(model)  # then every rank runs the forwards below together (FSDP gathers per block)
    loss_before = validation_loss(model, ctx.data.valid, eval_batch, eval_n) if ctx.is_main or sharded else None
    learned = choose_selection(stage, model, source_path, stage_dir, ctx)
    selection = learned.pop("selection")
    model = learned.pop("model", model)  # a distributed mask phase: the gathered weights on rank 0, else None
    if not ctx.is_main:
        return
    model.to(device)
    pruned = extract(model, selection)
    probe = PackedReader(ctx.data.valid, 1, shuffle=False).next_batch()
    gap = extraction_gap(model, pruned, selection, probe)
    check = Shape.of(pruned.config)
    if check != stage.target_shape:
        raise CpmctlError(f"internal: extracted shape ({check.describe()}) != target "
                          f"({stage.target_shape.describe()})", exit_code=1)
    loss_extracted = validation_loss(pruned, ctx.data.valid, eval_batch, eval_n)
    info = {"loss_before": loss_before, "loss_extracted": loss_extracted, "extraction_max_abs_diff": gap,
            "kept": kept_summary(model.config, selection), "source_config": model.config.to_dict(), **learned}
    save_native(pruned, extracted_dir, vocab=ctx.vocab, replace=True,
                extra={"extraction.json": json.dumps(info, indent=2) + "\n"})
    torch.save(selection.state_dict(), extracted_dir / "selection.pt")


def recover(stage: Stage, extracted_dir: Path, stage_dir: Path, ctx: StageContext,
            source_path: Path | None = None) -> tuple[CPMAnt | None, int]:
    """Recovery training of the extracted model; (the trained model on rank 0, None elsewhere; its steps)."""
    cfg = ctx.recipe.recovery
    engine = ctx.phase_engine(cfg)
    pruned = load_for(extracted_dir, engine, ctx.device(cfg, "recovery"))
    ctx.log_main(f"stage {stage.index}: recovery ({cfg.steps} steps; engine {cfg.engine})")
    valid = valid_reader(ctx.data.valid, cfg, engine)
    if valid is not None:  # a validation pass reads each held-out row at most once
        world = engine.world_size if engine is not None else 1
        cfg = dataclasses.replace(cfg, valid_batches=min(cfg.valid_batches,
                                                         len(ctx.data.valid) // (valid.batch_size * world)))
    loss_fn = lm_loss  # the loop's default
    distill = ctx.recipe.distill
    if distill.recovery and source_path is not None:  # distil from the stage's unpruned model (distill.recovery)
        teacher = load_for(source_path, engine, ctx.device(cfg, "recovery"), frozen=True)
        loss_fn = distilled_objective(shard_frozen(teacher, engine) if engine is not None else teacher, distill)
    result = train(pruned, train_reader(ctx.data.train, cfg, engine), cfg, stage_dir / "recovery", loss_fn=loss_fn,
                   valid=valid, save_model=_save_model_fn(ctx.vocab), resume=True, progress=ctx.progress)
    if engine is not None:
        pruned = full_copy(pruned, engine)
    return pruned, result.steps


def write_stage_outputs(stage: Stage, pruned: CPMAnt, selection: Selection, info: dict, recovery_steps: int,
                        stage_dir: Path, ctx: StageContext, seconds: float) -> None:
    """model/, original/, survivors.png, and report.json last (a stage with a report is finished)."""
    recipe = ctx.recipe
    device = ctx.device(recipe.recovery, "recovery")
    pruned = pruned.to(device)
    loss_after = validation_loss(pruned, ctx.data.valid, recipe.recovery.batch_size, recipe.data.eval_batches)
    native = save_native(pruned, stage_dir / "model", vocab=ctx.vocab, replace=True)
    pt, _ = save_original(pruned, stage_dir / "original" / "model")
    if ctx.vocab is not None:
        shutil.copyfile(ctx.vocab, stage_dir / "original" / VOCAB_FILE)
    source_config = type(pruned.config).from_dict(info["source_config"])
    png = plot_survivors(source_config, selection, stage_dir / "survivors.png",
                         f"stage {stage.index}: {stage.source_name} -> {stage.target_name}")
    shape = Shape.of(pruned.config)
    report = {
        "stage": stage.index, "from": stage.source_name, "to": stage.target_name, "method": recipe.method,
        "prunes": list(stage.kinds),
        "shape": {"attention_layers_kept": shape.attention_kept, "ffn_layers_kept": shape.ffn_kept,
                  "num_heads": shape.num_heads, "dim_ff": shape.dim_ff, "mask_modules": pruned.config.mask_modules},
        "kept": info["kept"],
        "loss": {"before": info["loss_before"], "extracted": info["loss_extracted"], "recovered": loss_after},
        "extraction_max_abs_diff": info["extraction_max_abs_diff"],
        "mask_phase": {k: info[k] for k in ("mask_steps", "expected_kept", "lambdas") if k in info},
        "recovery_steps": recovery_steps,
        "params": sum(p.numel() for p in pruned.parameters()),
        "model": str(native), "original": str(pt), "plot": str(png),
        "seconds": round(seconds, 1),
    }
    with atomic_file(stage_dir / "report.json") as f:
        f.write(json.dumps(ctx.rebase(report), indent=2) + "\n")


# ----- the whole run -------------------------------------------------------------------------------------------
@dataclass
class PrunePlan:
    source: str
    target: str
    stages: list[Stage]
    model: Path | None
    out_dir: Path | None
    vocab: Path | None
    config: CPMAntConfig | None  # the checkpoint's config, when --model is given

    def check_runnable(self) -> None:
        missing = [name for name, value in (("--model", self.model), ("--out", self.out_dir)) if value is None]
        if missing:
            raise CpmctlError(f"{' and '.join(missing)} required (or --dry-run)")

    def summary(self) -> dict:
        """What `--dry-run` prints: the stages, their target shapes and parameter counts (no weights read)."""
        vocab_size = self.config.vocab_size if self.config is not None else None
        return {"dry_run": True, "from": self.source, "to": self.target,
                "model": str(self.model) if self.model else None, "stages": plan_summary(self.stages, vocab_size)}

    def memory(self, recipe: PruneRecipe, nproc: int | None, device_memory_gb: float | None) -> dict:
        """`--dry-run --nproc N --device-memory GB`: per-rank bytes of each stage's mask phase and recovery, and
        whether the run fits (train/memory_plan.py plan_prune)."""
        from cpmctl.train.memory_plan import plan_prune

        return plan_prune(self.stages, self.config, self.model, recipe, nproc, device_memory_gb)


def prepare(source: str, target: str, model: str | Path | None = None, out_dir: str | Path | None = None,
            vocab: str | Path | None = None) -> PrunePlan:
    """Every check that needs no weights: the stages, reachability, the checkpoint's shape against --from, the
    vocabulary. A dry run stops here; a run needs --model and --out."""
    if source is None or target is None:
        raise CpmctlError("--from and --to are required (ladder names such as 10b / 7b, or config files)")
    stages = plan_stages(source, target)
    config = None
    if model is not None:
        model = Path(model)
        config, _ = read_config(model)
        check_checkpoint_shape(config, stages, model)
        vocab = find_vocab(model, vocab) if vocab is not None or vocab_beside(model) else None
    return PrunePlan(source, target, stages, model, Path(out_dir) if out_dir is not None else None, vocab, config)


def run_prune(plan: PrunePlan, recipe: PruneRecipe, *, progress: bool = True, log=print,
              on_stage: Callable[[dict], None] | None = None, force: bool = False) -> list[dict]:
    """Run every stage in turn; each stage reads the previous stage's output model. --out follows the output
    policy (cpmctl/outputs.py): locked for the run, an own directory resumed, `force` runs anew beside it."""
    plan.check_runnable()
    config = plan.config
    engine = _process_group(recipe)
    if engine is not None and force:
        engine.close()
        raise CpmctlError("--force with several processes: remove --out first, or choose a new one")
    if engine is not None and recipe.method == "learned" and not recipe.gates.train_weights:
        engine.close()  # DDP and FSDP need a parameter of the model to train
        raise CpmctlError("gates.train_weights: false runs the mask phase in one process; run without --nproc")
    inputs = [plan.model, plan.vocab, recipe.data.train, recipe.data.valid]
    try:
        is_main = engine is None or engine.is_main
        with run_dir(plan.out_dir, "prune", force=force, inputs=inputs, accept=lambda p: (p / "prune.json").exists(),
                     writer=is_main) as rd:
            batch_sizes = [recipe.recovery.batch_size] + ([recipe.mask.batch_size] if recipe.method == "learned" else [])
            data = open_data(recipe.data, config.vocab_size, batch_sizes)
            ctx = StageContext(recipe, data, plan.vocab, progress, log, rd.rebase, engine)
            work = dataclasses.replace(plan, out_dir=rd.work)
            if is_main:
                _write_run_info(work, recipe)
            ctx.barrier()
            reports, source = [], plan.model
            try:
                for stage in plan.stages:
                    stage_dir = work.out_dir / stage.dirname
                    report = run_stage(stage, source, stage_dir, ctx)
                    reports.append(report)
                    if on_stage is not None and is_main:
                        on_stage(rd.rebase(report))
                    source = stage_dir / "model"
            except TrainingInterrupted as e:
                if rd.temp:
                    raise rd.discarded(e.step) from None
                raise
            rd.commit()
    finally:
        if engine is not None:
            engine.close()
    return rd.rebase(reports)


def _process_group(recipe: PruneRecipe) -> Engine | None:
    """Under torchrun: `single` phases become ddp (one run, not a copy per process), and the process group is set
    up once for the whole run (the mask phase, extraction on rank 0, recovery). None in one process."""
    phases = [recipe.recovery] + ([recipe.mask] if recipe.method == "learned" else [])
    for cfg, at in ((recipe.mask, "mask.engine"), (recipe.recovery, "recovery.engine")):
        cfg.engine = engine_for_world(cfg.engine, at)
    kinds = {cfg.engine for cfg in phases}
    if kinds == {"single"}:
        return None
    if "single" in kinds:
        raise CpmctlError("mask.engine and recovery.engine: one is single, the other distributed; "
                          "run both under torchrun (ddp or fsdp) or both in one process")
    return setup_engine(recipe.recovery.engine, recipe.recovery.device)


def _write_run_info(plan: PrunePlan, recipe: PruneRecipe) -> None:
    """The run's recipe and stages, so a rerun can be checked against what was started."""
    info = {"model": str(plan.model), "stages": [s.dirname for s in plan.stages], "recipe": dataclasses.asdict(recipe)}
    path = plan.out_dir / "prune.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        shared = min(len(old.get("stages", [])), len(info["stages"]))
        # A rerun may go further down the same ladder; a different model or other stages is another run.
        if old.get("model") != info["model"] or old.get("stages", [])[:shared] != info["stages"][:shared]:
            raise CpmctlError(f"--out {plan.out_dir}: holds a prune run of {old.get('model')} "
                              f"({', '.join(old.get('stages', []))}); choose another --out or rerun that command")
    with atomic_file(path) as f:
        f.write(json.dumps(info, indent=2) + "\n")
