"""report.md for a lifecycle run, assembled from the JSON results each stage recorded in state.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cpmctl.io import atomic_file
from cpmctl.lifecycle.runner import Run


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(x, digits=3):
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _results(run: Run, stage: str) -> list[dict]:
    rec = run.state["stages"].get(stage)
    return rec["results"] if rec else []


def _data_section(run: Run) -> list[str]:
    lines = ["## Data", ""]
    filt, dedup = _results(run, "filter"), _results(run, "dedup")
    if filt:
        rules = sorted({k for r in filt for k in r.get("rejected", {})})
        header = ["batch", "documents in", "kept"] + [f"rejected: {k}" for k in rules] + ["paragraphs cleaned"]
        rows = []
        for i, r in enumerate(filt, 1):
            rows.append([f"batch {i}", r.get("documents"), r.get("kept")] + [r.get("rejected", {}).get(k, 0) for k in rules]
                        + [r.get("boilerplate_paragraphs_removed", "")])
        lines += ["Filter (rules in recipe order; the first rule that rejects a document is its reason):", ""]
        lines += _table(header, rows)
    if dedup:
        rows = [[f"batch {i}", r.get("documents"), r.get("kept"), r.get("duplicates"), r.get("new_paragraphs"),
                 r.get("store_paragraphs"), r.get("mb_per_s")] for i, r in enumerate(dedup, 1)]
        lines += ["Paragraph-hash dedup (threshold 70 %; one SQLite store shared by both batches, so batch 2 is "
                  "deduplicated against batch 1):", ""]
        lines += _table(["batch", "documents in", "kept", "duplicates", "new paragraphs", "store paragraphs", "MB/s"], rows)
    for r in _results(run, "vocab"):
        lines += [f"Vocabulary: {r.get('size')} tokens ({r.get('characters')} characters, {r.get('words')} words) "
                  f"learnt from {r.get('documents')} documents.", ""]
    for r in _results(run, "pack"):
        rows = [[name, s.get("rows"), s.get("records"), s.get("records_per_task", {}).get("lm"),
                 s.get("records_per_task", {}).get("mlm"), s.get("tokens"), s.get("fill")]
                for name, s in r.get("splits", {}).items()]
        lines += [f"Packed {r.get('documents')} documents ({r.get('tokens')} tokens) into rows:", ""]
        lines += _table(["split", "rows", "records", "lm records", "mlm records", "tokens", "fill"], rows)
    return lines


def _pretrain_section(run: Run, images: Path) -> list[str]:
    res = _results(run, "pretrain")
    if not res:
        return []
    r = res[-1]
    lines = ["## Pretraining", ""]
    keep = {k: v for k, v in r.items() if isinstance(v, (int, float)) or k in ("model", "final")}
    lines += ["| " + " | ".join(keep) + " |", "|" + "---|" * len(keep), "| " + " | ".join(_fmt(v) for v in keep.values()) + " |", ""]
    curve = Path(run.record("pretrain")["outputs"]["model"]).parent / "loss_curve.png"
    if curve.exists():
        shutil.copyfile(curve, images / "pretrain_loss.png")
        lines += ["![pretraining loss](images/pretrain_loss.png)", ""]
    return lines


def _prune_section(run: Run, images: Path) -> list[str]:
    res = _results(run, "prune")
    if not res:
        return []
    lines = ["## Pruning down the mini ladder", ""]
    rows = []
    for r in res:
        if "loss" not in r:
            continue
        shape, loss = r.get("shape", {}), r["loss"]
        rows.append([r.get("from"), r.get("to"), shape.get("attention_layers_kept"), shape.get("ffn_layers_kept"),
                     shape.get("num_heads"), shape.get("dim_ff"), r.get("params"), _fmt(loss.get("before")),
                     _fmt(loss.get("extracted")), _fmt(loss.get("recovered"))])
    lines += _table(["from", "to", "attention layers", "ffn layers", "heads", "dim_ff", "parameters",
                     "loss before", "loss after extraction", "loss after recovery"], rows)
    out = Path(run.record("prune")["outputs"]["out"])
    for png in sorted(out.rglob("survivors.png")):
        name = f"prune_{png.parent.name}_{png.name}"
        shutil.copyfile(png, images / name)
        lines += [f"![{png.parent.name}](images/{name})", ""]
    return lines


def _eval_section(run: Run, images: Path) -> list[str]:
    res = _results(run, "eval")
    if not res:
        return []
    lines = ["## Evaluation", ""]
    tasks = [r for r in res if "metrics" in r]
    if len(tasks) >= 2:
        before, after = tasks[0], tasks[1]
        keys = list(after["metrics"])
        lines += [f"Task `{after.get('task')}` on {after.get('n')} test examples, before and after LoRA tuning:", ""]
        lines += _table(["model"] + keys, [["untuned"] + [_fmt(before["metrics"].get(k, "")) for k in keys],
                                            ["LoRA-tuned"] + [_fmt(after["metrics"].get(k, "")) for k in keys]])
    ladder = [r for r in res if "loss" in r and "metrics" not in r]
    if ladder:
        rows = [[r.get("name", r.get("model")), r.get("params_non_embedding", r.get("params", "")), _fmt(r.get("loss")),
                 _fmt(r.get("ppl", r.get("perplexity", ""))), _fmt(r.get("relative", r.get("relative_performance", "")))]
                for r in ladder]
        lines += ["Held-out loss across the ladder (relative = loss of the first model / loss of each):", ""]
        lines += _table(["model", "non-embedding params", "loss", "ppl", "relative"], rows)
        png = Path(run.record("eval")["outputs"].get("ladder", "")) / "compare.png"
        if png.exists():
            shutil.copyfile(png, images / "ladder.png")
            lines += ["![ladder](images/ladder.png)", ""]
    return lines


def _generate_section(run: Run) -> list[str]:
    rec = run.state["stages"].get("generate")
    if not rec:
        return []
    lines = ["## Sample generations", ""]
    for name, path in rec["outputs"].items():
        if name == "prompts" or not Path(path).exists():
            continue
        lines += [f"**{name}**", ""]
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            text = r["text"].replace("\n", " ⏎ ")
            lines += [f"- {r['prompt']} → {text}"]
        lines += [""]
    return lines


def write_report(run: Run) -> Path:
    images = run.path("images")
    images.mkdir(exist_ok=True)
    lines = [f"# cpmctl lifecycle report: `{run.dir}`", "", f"Stages: {', '.join(run.recipe.stages)}; seed {run.recipe.seed}.", ""]
    lines += _data_section(run)
    lines += _pretrain_section(run, images)
    lines += _prune_section(run, images)
    lines += _eval_section(run, images)
    lines += _generate_section(run)
    rows = [[name, f"{rec['seconds']:.0f}s"] for name, rec in run.state["stages"].items()]
    lines += ["## Timings", ""] + _table(["stage", "time"], rows)
    lines += ["## Commands", "", "Every stage ran these commands (rerun any of them alone from a shell):", "", "```"]
    for name in run.recipe.stages:
        rec = run.state["stages"].get(name)
        if rec:
            lines += rec["commands"]
    lines += ["```", ""]
    report = run.path("report.md")
    with atomic_file(report) as f:
        f.write("\n".join(lines))
    return report
