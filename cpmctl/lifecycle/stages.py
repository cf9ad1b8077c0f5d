"""The lifecycle's stages. Each one runs documented `cpmctl` commands (see docs/run.md for the equivalent shell
script) and returns the paths it produced; the runner records them so a rerun skips finished stages."""

from __future__ import annotations

import json
from pathlib import Path

from cpmctl import CpmctlError
from cpmctl.lifecycle.runner import Run
# Recipe paths are relative to the working directory; the shipped ones (`recipes/...`, `cpmctl/assets/...`) also
# resolve from the installed package, and recipes may be built-in names (`pretrain/mini`).
from cpmctl.resources import bundled as _resolve


def _resolve_override(text: str) -> str:
    key, _, value = text.partition("=")
    return f"{key}={_resolve(value)}" if value and not value.startswith("[") else text


def _inputs(flag: str, paths: list[str]) -> list[str]:
    args = []
    for p in map(_resolve, paths):
        if not Path(p).exists():
            raise CpmctlError(f"data input not found: {p}")
        args += [flag, p]
    return args


def stage_filter(run: Run) -> dict:
    d = run.recipe.data
    outputs = {}
    for name, inputs in (("batch1", d.input), ("batch2", d.next_batch)):
        if not inputs:
            continue
        out = run.path("data", f"{name}.filtered.jsonl")
        rejected = run.path("data", f"{name}.rejected.jsonl")
        run.cpmctl("data", "filter", *_inputs("--input", inputs), "--output", out, "--recipe", _resolve(d.filter_recipe),
                   "--rejected", rejected, "--workers", d.workers,
                   *[_resolve_override(o) for o in d.filter_overrides])
        outputs[name] = out
    return outputs


def stage_dedup(run: Run) -> dict:
    """Both batches against one store: the second is deduplicated against everything the first added."""
    d = run.recipe.data
    store = run.path("data", "dedup.sqlite")
    outputs = {"store": store}
    for name, src in run.record("filter")["outputs"].items():
        out = run.path("data", f"{name}.dedup.jsonl")
        run.cpmctl("data", "dedup", "--input", src, "--output", out, "--store", store,
                   "--threshold", d.dedup_threshold, "--workers", d.workers)
        outputs[name] = out
    return outputs


def _clean_files(run: Run) -> list[str]:
    return [v for k, v in run.record("dedup")["outputs"].items() if k != "store"]


def stage_vocab(run: Run) -> dict:
    d = run.recipe.data
    vocab = run.path("data", "vocab.txt")
    run.cpmctl("data", "vocab", *_inputs("--input", _clean_files(run)), "--out", vocab, "--size", d.vocab_size,
               "--workers", d.workers)
    return {"vocab": vocab}


def stage_pack(run: Run) -> dict:
    d = run.recipe.data
    out = run.path("data", "packed")
    run.cpmctl("data", "pack", *_inputs("--input", _clean_files(run)), "--vocab", run.record("vocab")["outputs"]["vocab"],
               "--out", out, "--max-length", d.max_length, "--valid-fraction", d.valid_fraction,
               "--seed", run.recipe.seed, "--workers", d.workers)
    return {"train": out / "train", "valid": out / "valid"}


def _continue(run: Run, out: Path, resume: list[str]) -> list[str]:
    """A stage asked for again starts over (--force: the old output goes once the new one is complete); one cut
    short by a killed driver continues from its checkpoints."""
    from cpmctl.train.checkpointing import latest_checkpoint

    if run.forced:
        return ["--force"]
    return resume if latest_checkpoint(out) is not None else []


def stage_pretrain(run: Run) -> dict:
    packed = run.record("pack")["outputs"]
    out = run.path("pretrain")
    run.cpmctl("pretrain", *_continue(run, out, ["--resume", str(out)]), "--recipe", _resolve(run.recipe.pretrain.recipe),
               f"model.vocab={run.record('vocab')['outputs']['vocab']}", f"data.train={packed['train']}",
               f"data.valid={packed['valid']}", f"out_dir={out}", f"train.seed={run.recipe.seed}",
               *run.recipe.pretrain.overrides)
    return {"model": out / "final", "metrics": out / "metrics.jsonl"}


def stage_prune(run: Run) -> dict:
    p = run.recipe.prune
    packed = run.record("pack")["outputs"]
    out = run.path("prune")
    results = run.cpmctl("prune", *(["--force"] if run.forced else []),
                         "--model", run.record("pretrain")["outputs"]["model"], "--from", p.source,
                         "--to", p.target, "--data", packed["train"], "--valid", packed["valid"],
                         "--recipe", _resolve(p.recipe), "--out", out, *p.overrides)
    outputs = {"out": out}
    for r in results:
        stage_out = r.get("model") or r.get("out") or r.get("output")
        if stage_out and r.get("to"):
            outputs[f"model_{r['to']}"] = Path(stage_out)
    return outputs


def _tune_base(run: Run) -> Path:
    if run.recipe.tune.model == "pruned" and "prune" in run.state["stages"]:
        models = [v for k, v in run.record("prune")["outputs"].items() if k.startswith("model_")]
        if models:
            return Path(models[-1])
    return Path(run.record("pretrain")["outputs"]["model"])


def stage_tune(run: Run) -> dict:
    t = run.recipe.tune
    out = run.path("tune")
    base = _tune_base(run)
    results = run.cpmctl("tune", "lora", *_continue(run, out, ["--resume"]), "--task", t.task, "--model", base, "--data", _resolve(t.data), "--recipe", _resolve(t.recipe),
                         "--out", out, f"train.seed={run.recipe.seed}", *t.overrides)
    adapter = next((r.get("adapter") or r.get("best_adapter") for r in results if r.get("adapter") or r.get("best_adapter")), None)
    return {"adapter": Path(adapter) if adapter else out / "adapter", "base": base}


def stage_eval(run: Run) -> dict:
    """Task metrics before and after tuning, and the loss of every model of the ladder on held-out data."""
    t = run.recipe.tune
    out = run.path("eval")
    outputs = {"dir": out}
    if "tune" in run.state["stages"]:
        tune = run.record("tune")["outputs"]
        common = ["--task", t.task, "--data", _resolve(t.data), "--split", "test", "--model", tune["base"],
                  "--limit", t.eval_limit]
        run.cpmctl("eval", *common, "--out", out / "task-before")
        run.cpmctl("eval", *common, "--adapter", tune["adapter"], "--out", out / "task-after")
        outputs["task_after"] = out / "task-after"
    models, names = [], []
    if "pretrain" in run.state["stages"]:
        models.append(run.record("pretrain")["outputs"]["model"])
        names.append(run.recipe.prune.source)
    if "prune" in run.state["stages"]:
        for k, v in run.record("prune")["outputs"].items():
            if k.startswith("model_"):
                models.append(v)
                names.append(k[len("model_"):])
    if models:
        valid = run.record("pack")["outputs"]["valid"]
        args = ["eval", "compare", "--models", *models]
        for n in names:
            args += ["--names", n]
        run.cpmctl(*args, "--data", valid, "--out", out / "ladder")
        outputs["ladder"] = out / "ladder"
    return outputs


def stage_generate(run: Run) -> dict:
    g = run.recipe.generate
    prompts = run.path("generate", "prompts.jsonl")
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in g.prompts), encoding="utf-8")
    outputs = {"prompts": prompts}
    targets = []
    if "pretrain" in run.state["stages"]:
        targets.append((run.recipe.prune.source, run.record("pretrain")["outputs"]["model"]))
    if "prune" in run.state["stages"]:
        pruned = [(k[len("model_"):], v) for k, v in run.record("prune")["outputs"].items() if k.startswith("model_")]
        targets += pruned[-1:]
    for name, model in targets:
        results = run.cpmctl("generate", "--model", model, "--input", prompts, "--decode", g.decode,
                             "--max-new-tokens", g.max_new_tokens, "--repetition-penalty", g.repetition_penalty,
                             "--seed", run.recipe.seed, "--device", "cpu")
        path = run.path("generate", f"{name}.jsonl")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        outputs[name] = path
    return outputs


STAGES = {
    "filter": stage_filter,
    "dedup": stage_dedup,
    "vocab": stage_vocab,
    "pack": stage_pack,
    "pretrain": stage_pretrain,
    "prune": stage_prune,
    "tune": stage_tune,
    "eval": stage_eval,
    "generate": stage_generate,
}
