"""`cpmctl pretrain` as a library call: a recipe -> model, packed data readers -> the training loop -> out_dir/final.

A new model starts from a config (ladder name or JSON, the vocabulary fixes vocab_size); continued training
starts from any readable checkpoint (native, original .pt, HF) with a fresh optimizer and the recipe's schedule.
Resuming an interrupted run (`resume`) is different: it restores the run's own checkpoint exactly. The recipe
types (PretrainRecipe, TrainConfig) and `load_pretrain_recipe` are in train/recipe.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader
from cpmctl.io import atomic_dir
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import NATIVE_WEIGHTS, VOCAB_FILE, load_model, read_config, save_native
from cpmctl.model.config import resolve_config
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.recipe import check_recipe
from cpmctl.train.checkpointing import STATE_FILE
from cpmctl.train.engine import Engine, dist_env, engine_for_world, setup_engine
from cpmctl.outputs import run_dir
from cpmctl.train.loop import TrainingInterrupted, TrainResult, train
from cpmctl.train.sharded_start import init_sharded, load_sharded
from cpmctl.train.recipe import PretrainModel, PretrainRecipe


def resume_run_dir(resume: str | Path) -> Path:
    """The run directory of `--resume DIR`: DIR itself, or its parent when DIR is a step checkpoint."""
    path = Path(resume)
    if not path.exists():
        raise CpmctlError(f"--resume: {path} does not exist")
    return path.parent if (path / STATE_FILE).exists() else path


# ----- model ---------------------------------------------------------------------------------------------------
def _is_checkpoint(text: str) -> bool:
    """A directory or a weights file is a checkpoint (load_model says what is wrong with it); a name or a config
    JSON file starts a new model."""
    path = Path(text)
    return path.is_dir() or (path.is_file() and path.suffix in (".pt", ".bin", ".pth", ".safetensors"))


def build_pretrain_model(section: PretrainModel, engine: Engine | None = None):
    """(model, vocab path or None, description). A checkpoint continues; a config name starts a new model. With an
    fsdp `engine` the model is built straight into this rank's shards (train/sharded_start.py)."""
    sharded = engine is not None and engine.kind == "fsdp"
    if _is_checkpoint(section.init):
        model, info = load_sharded(section.init, engine.device) if sharded else load_model(section.init)
        vocab = Path(section.vocab) if section.vocab else info.vocab
        if vocab is not None and not vocab.exists():
            raise CpmctlError(f"model.vocab: file not found: {vocab}")
        return model, vocab, f"continued from {section.init} ({info.format})"
    config = resolve_config(section.init)
    if section.vocab is None:
        raise CpmctlError(f"model.vocab: a new model ({section.init}) needs a vocabulary file (its size is the "
                          "model's vocab_size)")
    vocab = Path(section.vocab)
    if not vocab.exists():
        raise CpmctlError(f"model.vocab: file not found: {vocab}")
    config.vocab_size = CPMAntTokenizer(vocab).vocab_size
    model = init_sharded(config, engine.device, section.seed) if sharded else build_model(config, seed=section.seed)
    return model, vocab, f"new {section.init} (seed {section.seed})"


def check_vocab_matches(dataset: PackedDataset, vocab: Path | None, vocab_size: int, key: str) -> None:
    """Before step 1: the packed data must use the model's vocabulary (size, and file hash when both are known)."""
    if dataset.vocab_size != vocab_size:
        raise CpmctlError(f"{key}: {dataset.path} was packed with a {dataset.vocab_size}-token vocabulary but the "
                          f"model has vocab_size {vocab_size}")
    packed_md5 = dataset.meta.get("vocab_md5")
    if vocab is not None and packed_md5:
        md5 = hashlib.md5(Path(vocab).read_bytes()).hexdigest()
        if md5 != packed_md5:
            raise CpmctlError(f"{key}: {dataset.path} was packed with another vocabulary (md5 {packed_md5}) than "
                              f"{vocab} (md5 {md5})")


def preflight(recipe: PretrainRecipe) -> None:
    """Every check that needs no weights: data directories, the model's config and vocabulary against the data.
    Run before launching processes, so a bad recipe fails once, with one line."""
    train_set = PackedDataset(recipe.data.train)
    section = recipe.model
    if _is_checkpoint(section.init):
        config, _ = read_config(section.init)
        root = Path(section.init) if Path(section.init).is_dir() else Path(section.init).parent
        vocab = Path(section.vocab) if section.vocab else (root / VOCAB_FILE if (root / VOCAB_FILE).exists() else None)
    else:
        config = resolve_config(section.init)
        if section.vocab is None:
            raise CpmctlError(f"model.vocab: a new model ({section.init}) needs a vocabulary file")
        vocab = Path(section.vocab)
        if not vocab.exists():
            raise CpmctlError(f"model.vocab: file not found: {vocab}")
        config.vocab_size = CPMAntTokenizer(vocab).vocab_size
    check_vocab_matches(train_set, vocab, config.vocab_size, "data.train")
    if recipe.data.valid:
        check_vocab_matches(PackedDataset(recipe.data.valid), vocab, config.vocab_size, "data.valid")


def plan_memory(recipe: PretrainRecipe, nproc: int | None, device_memory_gb: float | None) -> dict:
    """`--dry-run`: the per-rank memory plan of this recipe (train/memory_plan.py), no weights read. The row length
    is the packed data's when data.train exists, else DEFAULT_SEQ_LEN; vocab_size is the vocabulary's when the
    file exists."""
    from cpmctl.model.ant import param_counts
    from cpmctl.model.checkpoint import weight_files
    from cpmctl.train.memory_plan import DEFAULT_SEQ_LEN, checkpoint_bytes_per_param, plan_recipe_phase, verdict

    section, on_disk = recipe.model, 0
    if _is_checkpoint(section.init):
        config, _ = read_config(section.init)
        on_disk = checkpoint_bytes_per_param(weight_files(section.init), param_counts(config)["total"])
    else:
        config = resolve_config(section.init)
        if section.vocab and Path(section.vocab).exists():
            config.vocab_size = CPMAntTokenizer(section.vocab).vocab_size
    train_path = Path(recipe.data.train) if recipe.data.train else None
    seq_len = PackedDataset(train_path).max_length if train_path and train_path.is_dir() else DEFAULT_SEQ_LEN
    plan, smallest = plan_recipe_phase(config, recipe.train, seq_len=seq_len, nproc=nproc,
                                       device_memory_gb=device_memory_gb, checkpoint_bytes=on_disk)
    return {"dry_run": True, "model": section.init, "seq_len": seq_len, "plan": plan.to_dict(),
            "verdict": verdict([plan], smallest, plan.engine)}


# ----- run -----------------------------------------------------------------------------------------------------
def _earlier_run(path: Path) -> bool:
    """An out_dir of a cpmctl older than the output markers."""
    return (path / "latest").exists() or (path / "metrics.jsonl").exists()


def run_pretrain(recipe: PretrainRecipe, *, progress: bool = True, log=print, force: bool = False) -> dict:
    """Train as the recipe says; returns the summary (the `--json` object). Rank 0 writes out_dir/final.
    out_dir follows the output policy (cpmctl/outputs.py): locked for the run, refused when it holds something
    else; `force` trains a new run beside it and swaps it in when complete."""
    check_recipe(recipe)
    recipe.train.engine = engine_for_world(recipe.train.engine)
    rank, _, world_size = dist_env() if recipe.train.engine != "single" else (0, 0, 1)
    if force and recipe.resume:
        raise CpmctlError("--force starts a new run (it replaces out_dir once complete); it does not go with --resume")
    if force and world_size > 1:
        raise CpmctlError("--force with several processes: remove out_dir first, or choose a new one")
    init = recipe.model.init if _is_checkpoint(recipe.model.init) else None
    inputs = [recipe.data.train, recipe.data.valid, init, recipe.model.vocab]
    with run_dir(recipe.out_dir, "pretrain", force=force, inputs=inputs, what="out_dir", accept=_earlier_run,
                 writer=rank == 0) as rd:
        try:
            summary = _pretrain(recipe, rd.work, rank, world_size, progress, log)
        except TrainingInterrupted as e:
            if rd.temp:
                raise rd.discarded(e.step) from None
            raise
        rd.commit()
    return rd.rebase(summary)


def _pretrain(recipe: PretrainRecipe, out_dir: Path, rank: int, world_size: int, progress: bool, log) -> dict:
    cfg = recipe.train

    # fsdp: the process group is up before the model exists, so each rank builds only its shards.
    engine = setup_engine(cfg.engine, cfg.device) if cfg.engine == "fsdp" else None
    try:
        return _pretrain_on(recipe, out_dir, rank, world_size, progress, log, engine)
    finally:
        if engine is not None:
            engine.close()


def _pretrain_on(recipe: PretrainRecipe, out_dir: Path, rank: int, world_size: int, progress: bool, log,
                 engine: Engine | None) -> dict:
    cfg = recipe.train
    train_set = PackedDataset(recipe.data.train)
    valid_set = PackedDataset(recipe.data.valid) if recipe.data.valid else None
    model, vocab, origin = build_pretrain_model(recipe.model, engine)
    check_vocab_matches(train_set, vocab, model.config.vocab_size, "data.train")
    if valid_set is not None:
        check_vocab_matches(valid_set, vocab, model.config.vocab_size, "data.valid")

    data = PackedReader(train_set, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
    valid = None
    if valid_set is not None and cfg.valid_batches > 0:
        valid = PackedReader(valid_set, cfg.batch_size, rank=rank, world_size=world_size, shuffle=False)
        available = len(valid_set) // (cfg.batch_size * world_size)
        if cfg.valid_batches > available:
            cfg.valid_batches = available  # a validation pass reads each held-out row at most once
    if rank == 0:
        log(f"{origin}: {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{len(train_set):,} training rows of {train_set.max_length} tokens; engine {cfg.engine} x {world_size}")

    def save_model(m, directory: Path) -> None:
        save_native(m, directory, vocab=vocab)

    result: TrainResult = train(model, data, cfg, out_dir, valid=valid, save_model=save_model,
                                resume=recipe.resume, progress=progress)
    final = out_dir / "final"
    if rank == 0 and result.checkpoint is not None:
        export_final(result.checkpoint, final)
    return {
        "out_dir": str(out_dir),
        "final": str(final),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "valid_loss": result.valid_loss,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
        "engine": cfg.engine,
        "world_size": world_size,
        "metrics": str(out_dir / "metrics.jsonl"),
        "loss_curve": str(out_dir / "loss_curve.png"),
    }


def export_final(checkpoint: Path, final: Path) -> Path:
    """out_dir/final: the model part of the last checkpoint (config, weights, vocab), without the trainer state."""
    with atomic_dir(final, replace=True) as tmp:
        for name in ("config.json", NATIVE_WEIGHTS, VOCAB_FILE):
            if (checkpoint / name).exists():
                shutil.copyfile(checkpoint / name, tmp / name)
    return final
