"""`cpmctl eval compare`: the loss of several models on the same data, as the CPM-Ant README's ladder table.

Relative performance is the reference model's loss divided by each model's loss (the first model is the
reference). The README's column (10b 2.420 = 100 %, 7b 2.510 = 96.3 %, 3b 92.4 %, 1b 86.0 %, 300m 76.2 %) is not
this ratio (2.420 / 2.510 = 96.4 %, 2.420 / 2.998 = 80.7 %); all four of its numbers are reproduced by
(a - loss) / (a - 2.420) with a in [4.8435, 4.8438], a normalisation the README does not explain, so we report
the plain ratio.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cpmctl import CpmctlError
from cpmctl.evaluate.runner import check_scoring_options, is_packed, load_scoring_model, model_perplexity
from cpmctl.io import atomic_file, atomic_path
from cpmctl.outputs import claim

MARKDOWN_FILE = "compare.md"
CHART_FILE = "compare.png"
JSON_FILE = "compare.json"


@dataclass
class CompareReport:
    rows: list[dict]
    markdown_path: Path
    chart_path: Path
    json_path: Path


def relative_performance(losses: list[float]) -> list[float]:
    """100 * reference loss / loss, the first model being the reference."""
    return [100.0 * (losses[0] / loss) for loss in losses]


def markdown_table(rows: list[dict], data: str) -> str:
    lines = [f"Loss on `{data}` (relative = loss of {rows[0]['model']} / loss).", "",
             "| model | non-embedding params | loss | ppl | bits/char | relative |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpc = "n/a" if r["bpc"] is None else f"{r['bpc']:.4f}"
        lines.append(f"| {r['model']} | {r['params_non_embedding']:,} | {r['loss']:.3f} | {r['ppl']:.3f} | {bpc} | "
                     f"{r['relative']:.1f}% |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path, title: str) -> Path:
    """Loss per model, bars labelled with the relative performance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.6))
    bars = ax.bar(names, losses, color="#4c72b0")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['loss']:.3f}\n{r['relative']:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("LM loss (nats / token)")
    ax.set_ylim(0, max(losses) * 1.2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def compare_models(models: list[str | Path], data: str | Path, out_dir: str | Path, names: list[str] | None = None,
                   batch_size: int = 8, max_length: int = 1024, limit: int | None = None,
                   device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                   vocab: str | Path | None = None,
                   progress: Callable[[int], Callable[[int], None]] | None = None,
                   log: Callable[[str], None] | None = None, force: bool = False) -> CompareReport:
    """Score every model on `data` (one at a time, so only one is in memory) and write the table and chart."""
    from cpmctl.model.ant import param_counts

    if len(models) < 2:
        raise CpmctlError("--models needs at least two checkpoints to compare")
    if names and len(names) != len(models):
        raise CpmctlError(f"--names gives {len(names)} labels for {len(models)} models")
    check_scoring_options(batch_size, max_length, limit)
    if not Path(data).exists():
        raise CpmctlError(f"data not found: {data}")
    labels = list(names) if names else [Path(m).name or str(m) for m in models]
    if len(set(labels)) != len(labels):
        raise CpmctlError(f"model labels repeat ({', '.join(labels)}); give distinct --names")
    output = claim(out_dir, "eval compare", force=force, inputs=[*models, data, vocab])
    results = []
    for label, path in zip(labels, models):
        model, tokenizer = load_scoring_model(path, vocab, device, dtype, need_vocab=not is_packed(data))
        tick = (lambda total, _name: progress(total)) if progress is not None else None
        result = model_perplexity(model, tokenizer, data, label, batch_size, max_length, limit, tick)
        results.append((label, path, model.config, result))
        if log is not None:
            log(f"{label}: loss {result.loss:.4f} over {result.tokens:,} tokens")
        del model
    token_counts = {r.tokens for *_, r in results}
    if len(token_counts) > 1:
        raise CpmctlError(f"the models score different numbers of tokens ({', '.join(str(r.tokens) for *_, r in results)}): "
                          "their vocabularies differ, so their losses are not comparable")
    relative = relative_performance([r.loss for *_, r in results])
    rows = []
    for (label, path, config, r), rel in zip(results, relative):
        rows.append({"model": label, "path": str(path), "params_non_embedding": param_counts(config)["non_embedding"],
                     "tokens": r.tokens, "loss": r.loss, "ppl": r.ppl, "bpc": r.bpc, "relative": rel})
    out_dir = Path(out_dir)
    with output.directory() as tmp:
        with atomic_file(tmp / MARKDOWN_FILE, encoding="utf-8") as f:
            f.write(markdown_table(rows, str(data)))
        with atomic_file(tmp / JSON_FILE, encoding="utf-8") as f:
            f.write(json.dumps({"data": str(data), "rows": rows}, ensure_ascii=False, indent=2) + "\n")
        bar_chart(rows, tmp / CHART_FILE, f"LM loss on {Path(data).name}")
    return CompareReport(rows, out_dir / MARKDOWN_FILE, out_dir / CHART_FILE, out_dir / JSON_FILE)
