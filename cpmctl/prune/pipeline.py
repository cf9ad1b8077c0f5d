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

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader, RowRange
from cpmctl.io import atomic_file
from cpmctl.model.ant import CPMAnt
from cpmctl.model.checkpoint import VOCAB_FILE, find_vocab, load_model, read_config, save_native, save_original, vocab_beside
from cpmctl.model.config import CPMAntConfig
from cpmctl.prune.baselines import magnitude_selection, random_selection
from cpmctl.prune.extract import extract
from cpmctl.prune.gates import Selection, clear_gates
from cpmctl.prune.mask_phase import MaskPhase, lm_objective
from cpmctl.prune.recipe import PruneData, PruneRecipe
from cpmctl.prune.report import kept_summary, plot_survivors
from cpmctl.prune.targets import Shape, Stage, check_checkpoint_shape, plan_stages, plan_summary
from cpmctl.device import resolve_device
from cpmctl.train.engine import Engine
from cpmctl.outputs import run_dir
from cpmctl.train.loop import TrainConfig, TrainingInterrupted, evaluate, train


# ----- data ----------------------------------------------------------------------------------------------------
@dataclass
class StageData:
    train: PackedDataset | RowRange
    valid: PackedDataset | RowRange


def open_data(section: PruneData, vocab_size: int, batch_sizes: list[int]) -> StageData:
    """Training rows and validation rows, checked against the model's vocabulary before any work."""
    if not section.train:
        raise CpmctlError("--data: the packed training data directory is required (`cpmctl data pack`)")
    train_set = PackedDataset(section.train)
    train_set.check_vocab(vocab_size, "model (--data)")
    if section.valid:
        valid_set = PackedDataset(section.valid)
        valid_set.check_vocab(vocab_size, "model (data.valid)")
        train_rows: PackedDataset | RowRange = train_set
    else:
        n = section.valid_rows
        if n <= 0 or n >= len(train_set):
            raise CpmctlError(f"{train_set.path}: {len(train_set)} rows cannot hold out data.valid_rows={n} rows "
                              "for validation; pass --valid or change data.valid_rows")
        train_rows = RowRange(train_set, 0, len(train_set) - n)
        valid_set = RowRange(train_set, len(train_set) - n, len(train_set))
    need = max(batch_sizes)
    if len(train_rows) < need:
        raise CpmctlError(f"{train_set.path}: {len(train_rows)} training rows is fewer than one batch ({need})")
    if len(valid_set) < 1:
        raise CpmctlError(f"{section.valid}: no validation rows")
    return StageData(train_rows, valid_set)


def validation_loss(model: CPMAnt, valid_rows, batch_size: int, batches: int) -> float:
    """Token-weighted LM loss over the first `batches` batches of the validation rows (always the same rows)."""
    device = model.input_embedding.weight.device
    reader = PackedReader(valid_rows, min(batch_size, len(valid_rows)), shuffle=False)
    batches = max(1, min(batches, len(valid_rows) // reader.batch_size))
    row = evaluate(model, reader, lm_objective, batches, Engine("single", device), contextlib.nullcontext)
    return float(row["valid_loss"])


# ----- one stage -----------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    recipe: PruneRecipe
    data: StageData
    vocab: Path | None
    progress: bool = True
    log: Callable[[str], None] = print
    rebase: Callable = lambda value: value  # paths in the work directory -> paths in --out (a --force run)


def _save_model_fn(vocab: Path | None):
    def save(model, directory: Path) -> None:
        save_native(model, directory, vocab=vocab)

    return save


def _reader(rows, cfg: TrainConfig) -> PackedReader:
    return PackedReader(rows, cfg.batch_size, seed=cfg.seed)


def _valid_reader(rows, cfg: TrainConfig):
    if cfg.valid_batches <= 0:
        return None
    return PackedReader(rows, min(cfg.batch_size, len(rows)), shuffle=False)


def learn_selection(stage: Stage, model: CPMAnt, source_path: Path, stage_dir: Path, ctx: StageContext) -> dict:
    """The mask phase: train gates and weights jointly; returns the selection and what it learned."""
    recipe = ctx.recipe
    device = resolve_device(recipe.mask.device, what="mask.device")
    teacher = None
    if recipe.distill.weight > 0:
        teacher, _ = load_model(source_path, device=device)
        teacher.requires_grad_(False)
    phase = MaskPhase(stage, model.config, recipe, teacher).to(device)
    model.to(device)
    ctx.log(f"stage {stage.index}: mask phase ({recipe.mask.steps} steps; gates on {', '.join(stage.kinds)})")
    result = train(model, _reader(ctx.data.train, recipe.mask), recipe.mask, stage_dir / "mask",
                   loss_fn=phase.loss, param_groups=phase.param_groups(model, recipe), on_step=phase.on_step,
                   save_model=_save_model_fn(ctx.vocab), extra_state=phase, resume=True, progress=ctx.progress)
    clear_gates(model)
    expected = {k: float(v.detach().mean()) * phase.masks.totals()[k]
                for k, v in phase.masks.expected_fractions().items()}
    return {"selection": phase.masks.select(phase.targets), "mask_steps": result.steps, "expected_kept": expected,
            "lambdas": phase.lagrangian.lambdas.detach().cpu().tolist()}


def choose_selection(stage: Stage, model: CPMAnt, source_path: Path, stage_dir: Path, ctx: StageContext) -> dict:
    recipe = ctx.recipe
    if recipe.method == "learned":
        return learn_selection(stage, model, source_path, stage_dir, ctx)
    if recipe.method == "random":
        return {"selection": random_selection(model, stage.kinds, stage.target_counts(), seed=recipe.seed + stage.index)}
    return {"selection": magnitude_selection(model, stage.kinds, stage.target_counts())}


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
    """Run (or finish) one stage; returns its report."""
    report_path = stage_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report["status"] = "skipped (finished earlier)"
        return report
    recipe, started = ctx.recipe, time.perf_counter()
    eval_batch, eval_n = recipe.recovery.batch_size, recipe.data.eval_batches
    device = resolve_device(recipe.recovery.device, what="recovery.device")
    extracted_dir = stage_dir / "extracted"

    if not (extracted_dir / "selection.pt").exists():
        model, _ = load_model(source_path, device=device)
        loss_before = validation_loss(model, ctx.data.valid, eval_batch, eval_n)
        learned = choose_selection(stage, model, source_path, stage_dir, ctx)
        selection = learned.pop("selection")
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
        # selection.pt inside the atomically written directory marks the mask phase + extraction as done.
        save_native(pruned, extracted_dir, vocab=ctx.vocab, replace=True,
                    extra={"extraction.json": json.dumps(info, indent=2) + "\n"})
        torch.save(selection.state_dict(), extracted_dir / "selection.pt")
        del model
    info = json.loads((extracted_dir / "extraction.json").read_text(encoding="utf-8"))
    selection = Selection.from_state_dict(torch.load(extracted_dir / "selection.pt", weights_only=True))

    pruned, _ = load_model(extracted_dir, device=device)
    ctx.log(f"stage {stage.index}: recovery ({recipe.recovery.steps} steps)")
    cfg = recipe.recovery
    valid = _valid_reader(ctx.data.valid, cfg)
    if valid is not None:  # a validation pass reads each held-out row at most once
        cfg = dataclasses.replace(cfg, valid_batches=min(cfg.valid_batches, len(ctx.data.valid) // valid.batch_size))
    result = train(pruned, _reader(ctx.data.train, cfg), cfg, stage_dir / "recovery",
                   valid=valid, save_model=_save_model_fn(ctx.vocab), resume=True, progress=ctx.progress)
    loss_after = validation_loss(pruned, ctx.data.valid, eval_batch, eval_n)

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
        "recovery_steps": result.steps,
        "params": sum(p.numel() for p in pruned.parameters()),
        "model": str(native), "original": str(pt), "plot": str(png),
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_file(report_path) as f:
        f.write(json.dumps(ctx.rebase(report), indent=2) + "\n")
    report["status"] = "done"
    return report


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
    inputs = [plan.model, plan.vocab, recipe.data.train, recipe.data.valid]
    with run_dir(plan.out_dir, "prune", force=force, inputs=inputs, accept=lambda p: (p / "prune.json").exists()) as rd:
        batch_sizes = [recipe.recovery.batch_size] + ([recipe.mask.batch_size] if recipe.method == "learned" else [])
        data = open_data(recipe.data, config.vocab_size, batch_sizes)
        ctx = StageContext(recipe, data, plan.vocab, progress, log, rd.rebase)
        work = dataclasses.replace(plan, out_dir=rd.work)
        _write_run_info(work, recipe)
        reports, source = [], plan.model
        try:
            for stage in plan.stages:
                stage_dir = work.out_dir / stage.dirname
                report = run_stage(stage, source, stage_dir, ctx)
                reports.append(report)
                if on_stage is not None:
                    on_stage(rd.rebase(report))
                source = stage_dir / "model"
        except TrainingInterrupted as e:
            if rd.temp:
                raise rd.discarded(e.step) from None
            raise
        rd.commit()
    return rd.rebase(reports)


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
