"""`cpmctl eval` core: run a task on a model (decode or score options, then metrics), or score predictions that
any system wrote; and perplexity on raw text or packed data. Outputs: `predictions.jsonl` (one record per example,
in data order) and `scores.json` side by side in the output directory, each written atomically. The recipe
(EvalRecipe) is in evaluate/recipe.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl import CpmctlError
from cpmctl.io import atomic_file
from cpmctl.model.tokenizer import NEWLINE, SPACE, CPMAntTokenizer
from cpmctl.outputs import claim
from cpmctl.evaluate.predict import predict
from cpmctl.evaluate.recipe import EvalRecipe
from cpmctl.recipe import check_recipe
from cpmctl.data.textio import read_jsonl
from cpmctl.tasks import Example, Task

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


# ----- results -------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    task: str
    n: int
    metrics: dict[str, float]
    predictions_path: Path | None = None
    scores_path: Path | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"task": self.task, "n": self.n, "metrics": self.metrics}
        written = self.predictions_path or self.scores_path
        if written is not None:
            out["output"] = str(written.parent)  # the output directory: the one spelling of every command's JSON
        if self.predictions_path is not None:
            out["predictions"] = str(self.predictions_path)
        if self.scores_path is not None:
            out["scores"] = str(self.scores_path)
        return out


def load_examples(task: Task, data: str | Path, split: str = "test", limit: int | None = None) -> list[Example]:
    examples = task.load_split(data, split)
    return examples[:limit] if limit else examples


def work_units(task: Task, examples: list[Example]) -> int:
    """How many progress ticks `task.predict` reports: one per option for choice tasks, else one per example."""
    return sum(len(ex.options) for ex in examples) if task.kind == "choice" else len(examples)


def reference_of(task: Task, example: Example):
    if task.kind == "generation":
        return example.answer if example.answer is not None else example.target
    return example.label if task.kind == "choice" else example.relevance


def input_fields(task: Task, data: str | Path, split: str, examples: list[Example]) -> list[dict]:
    """Per example, the fields of its input line that the task does not read (a source, a category; the id is the
    prediction record's own), carried into predictions.jsonl so a prediction can be joined back to its input."""
    data = Path(data)
    lines = dict(read_jsonl(data / f"{split}.jsonl" if data.is_dir() else data))
    read = {task.key(name) for name in (*task.schema, "answer", "id", "qid")}
    return [{k: v for k, v in lines.get(ex.line, {}).items() if k not in read} for ex in examples]


def write_predictions(path: Path, task: Task, examples: list[Example], predictions: list,
                      fields: list[dict] | None = None) -> Path:
    with atomic_file(path, encoding="utf-8") as f:
        for i, (ex, p) in enumerate(zip(examples, predictions)):
            record = {**(fields[i] if fields else {}), **task.prediction_record(p, ex),
                      "reference": reference_of(task, ex)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_scores(path: Path, result: dict) -> Path:
    with atomic_file(path, encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return path


# ----- model evaluation ----------------------------------------------------------------------------------------
def evaluate_model(task: Task, examples: list[Example], model, tokenizer: CPMAntTokenizer, batch_size: int = 8,
                   decode: dict | None = None, progress: Callable[[int], None] | None = None) -> tuple[list, dict]:
    """Predictions (decoded text, chosen option or relevance score) and the task's metrics."""
    with torch.no_grad():
        predictions = predict(task, model, tokenizer, examples, batch_size=batch_size, progress=progress,
                                   **(decode or {}))
    return predictions, task.score(predictions, examples)


def load_eval_model(model_path: str | Path, adapter: str | Path | None, vocab: str | Path | None,
                    device: torch.device, dtype: torch.dtype):
    """The model (with its LoRA adapter, if any) and a tokenizer that fits it."""
    from cpmctl.model.checkpoint import load_tokenizer
    from cpmctl.model.lora import load_model_with_adapter

    model, _ = load_model_with_adapter(model_path, adapter, device=device, dtype=dtype)
    return model, load_tokenizer(model_path, vocab, model.config.vocab_size)


def run_model_eval(task: Task, data: str | Path, model_path: str | Path, out_dir: str | Path, recipe: EvalRecipe,
                   device: torch.device, dtype: torch.dtype, adapter: str | Path | None = None,
                   vocab: str | Path | None = None,
                   progress: Callable[[int, int], Callable[[int], None]] | None = None,
                   force: bool = False) -> EvalResult:
    """Evaluate a model on a task; writes predictions.jsonl and scores.json into `out_dir` (a directory written
    whole, by the output policy of cpmctl/outputs.py).

    `progress(total, ...)` is called once with the number of work units and returns the per-batch tick."""
    check_recipe(recipe)
    output = claim(out_dir, "eval", force=force, inputs=[data, model_path, adapter, vocab])
    examples = load_examples(task, data, recipe.eval.split, recipe.eval.limit)
    model, tokenizer = load_eval_model(model_path, adapter, vocab, device, dtype)
    tick = progress(work_units(task, examples)) if progress is not None else None
    predictions, metrics = evaluate_model(task, examples, model, tokenizer, recipe.eval.batch_size,
                                          recipe.decode_overrides(), tick)
    out_dir = Path(out_dir)
    decode = asdict(task.decode.updated(recipe.decode_overrides())) if task.kind == "generation" else None
    scores = {"task": task.name, "n": len(examples), "metrics": metrics, "model": str(model_path),
              "adapter": None if adapter is None else str(adapter), "data": str(data), "split": recipe.eval.split,
              "decode": decode}
    with output.directory() as tmp:
        write_predictions(tmp / PREDICTIONS_FILE, task, examples, predictions,
                          input_fields(task, data, recipe.eval.split, examples))
        write_scores(tmp / SCORES_FILE, scores)
    return EvalResult(task.name, len(examples), metrics, out_dir / PREDICTIONS_FILE, out_dir / SCORES_FILE)


# ----- scoring existing predictions ----------------------------------------------------------------------------
def read_predictions(path: str | Path, task: Task, examples: list[Example]) -> list:
    """Predictions aligned with `examples`: by `id` when every example and every prediction has one (and the
    example ids are unique), else line by line."""
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise CpmctlError(f"{path}: no predictions (the file is empty)")
    for n, obj in rows:
        if "prediction" not in obj:
            raise CpmctlError(f"{path}:{n}: missing field 'prediction'")
    example_ids = [ex.id for ex in examples]
    by_id = all(i is not None for i in example_ids) and len(set(example_ids)) == len(example_ids) and all(
        obj.get("id") is not None for _, obj in rows
    )
    if not by_id:
        if len(rows) != len(examples):
            raise CpmctlError(
                f"{path}: {len(rows)} predictions for {len(examples)} examples (lines are matched in order; "
                f"give every line an 'id' to match by id)"
            )
        return [task.parse_prediction(obj["prediction"], ex, f"{path}:{n}") for (n, obj), ex in zip(rows, examples)]
    found: dict[str, tuple[int, Any]] = {}
    for n, obj in rows:
        key = str(obj["id"])
        if key in found:
            raise CpmctlError(f"{path}:{n}: duplicate id '{key}' (first at line {found[key][0]})")
        found[key] = (n, obj["prediction"])
    missing = [i for i in example_ids if i not in found]
    if missing:
        raise CpmctlError(f"{path}: no prediction for id '{missing[0]}' ({len(missing)} of {len(examples)} missing)")
    extra = sorted(set(found) - set(example_ids))
    if extra:
        raise CpmctlError(f"{path}:{found[extra[0]][0]}: id '{extra[0]}' is not in the data")
    return [task.parse_prediction(found[ex.id][1], ex, f"{path}:{found[ex.id][0]}") for ex in examples]


def run_prediction_eval(task: Task, data: str | Path, predictions: str | Path, recipe: EvalRecipe,
                        out_dir: str | Path | None = None, force: bool = False) -> EvalResult:
    """Score predictions written by any system; with `out_dir`, scores.json is written there (a directory written
    whole, by the output policy of cpmctl/outputs.py)."""
    check_recipe(recipe)
    output = claim(out_dir, "eval", force=force, inputs=[data, predictions]) if out_dir is not None else None
    examples = load_examples(task, data, recipe.eval.split, recipe.eval.limit)
    preds = read_predictions(predictions, task, examples)
    metrics = task.score(preds, examples)
    scores_path = None
    if out_dir is not None:
        scores = {"task": task.name, "n": len(examples), "metrics": metrics, "predictions": str(predictions),
                  "data": str(data), "split": recipe.eval.split}
        with output.directory() as tmp:
            write_scores(tmp / SCORES_FILE, scores)
        scores_path = Path(out_dir) / SCORES_FILE
    return EvalResult(task.name, len(examples), metrics, None, scores_path)


# ----- perplexity ----------------------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    """Summed negative log-likelihood (nats) over the scored tokens; ppl = exp(nll / tokens)."""

    model: str
    data: str
    source: str  # raw | packed
    units: int  # documents (raw) or rows (packed) scored
    tokens: int
    nll: float
    chars: int | None = None

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bpc(self) -> float | None:
        return self.nll / math.log(2) / self.chars if self.chars else None

    def to_json(self) -> dict:
        return {"model": self.model, "data": self.data, "source": self.source, "units": self.units,
                "tokens": self.tokens, "loss": self.loss, "ppl": self.ppl, "bpc": self.bpc}


def is_packed(data: str | Path) -> bool:
    return Path(data).is_dir() and (Path(data) / "meta.json").exists()


def read_documents(data: str | Path, limit: int | None = None) -> list[str]:
    """Raw documents (jsonl with 'text', or text with one document per line), as `data filter` reads them."""
    from cpmctl.data.textio import MalformedLine, parse_line, read_chunks, resolve_inputs

    texts: list[str] = []
    for shard in resolve_inputs([data]):
        for first, lines in read_chunks(shard):
            for i, line in enumerate(lines):
                try:
                    parsed = parse_line(line, shard.format)
                except MalformedLine as e:
                    raise CpmctlError(f"{shard.path}:{first + i + 1}: {e}") from None
                if parsed is not None and parsed[0].strip():
                    texts.append(parsed[0])
                    if limit and len(texts) >= limit:
                        return texts
    if not texts:
        raise CpmctlError(f"{data}: no documents to score")
    return texts


def raw_text_nll(model, tokenizer: CPMAntTokenizer, texts: list[str], max_length: int = 1024, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None, chunk: int = 64) -> tuple[float, int, int]:
    """(nll, tokens, characters) of documents, scored by `perplexity.score_documents` a chunk at a time."""
    from cpmctl.model.perplexity import score_documents

    nll, tokens, chars = 0.0, 0, 0
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        for score in score_documents(model, tokenizer, part, max_length=max_length, batch_size=batch_size):
            nll, tokens, chars = nll + score.nll_sum, tokens + score.tokens, chars + score.chars
        if progress is not None:
            progress(len(part))
    return nll, tokens, chars


def token_char_lengths(tokenizer: CPMAntTokenizer) -> np.ndarray:
    """Characters each token stands for; special tokens (<s>, </s>, <pad>, ...) stand for none."""
    lengths = np.array([len(t) for t in tokenizer.id_to_token], dtype=np.int64)
    lengths[:10] = 0
    lengths[[SPACE, NEWLINE]] = 1
    return lengths


@torch.no_grad()
def packed_nll(model, dataset, batch_size: int = 8, limit: int | None = None, tokenizer: CPMAntTokenizer | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[float, int, int | None]:
    """(nll, target tokens, characters of the targets) over the rows of a packed dataset, in order: the lm loss of
    training (`objectives.token_losses`) summed instead of averaged."""
    from cpmctl.data.packed_format import to_batch
    from cpmctl.train.objectives import token_losses

    dataset.check_vocab(model.config.vocab_size)
    device = next(model.parameters()).device
    lengths = token_char_lengths(tokenizer) if tokenizer is not None else None
    rows = min(len(dataset), limit) if limit else len(dataset)
    nll, tokens, chars = 0.0, 0, 0
    for start in range(0, rows, batch_size):
        index = np.arange(start, min(start + batch_size, rows))
        batch = to_batch(dataset.rows(index), device)
        losses, mask = token_losses(model, batch)
        nll += float(losses.double().sum())
        tokens += int(mask.sum())
        if lengths is not None:
            chars += int(lengths[batch["target"][mask].cpu().numpy()].sum())
        if progress is not None:
            progress(len(index))
    if tokens == 0:
        raise CpmctlError(f"{dataset.path}: no target tokens to score")
    return nll, tokens, chars if lengths is not None else None


def model_perplexity(model, tokenizer: CPMAntTokenizer | None, data: str | Path, name: str = "model",
                     batch_size: int = 8, max_length: int = 1024, limit: int | None = None,
                     progress: Callable[[int, str], Callable[[int], None]] | None = None) -> PerplexityResult:
    """Perplexity of a loaded model on raw text or packed data. `progress(total, label)` returns the tick."""
    from cpmctl.data.packed_format import PackedDataset

    model.eval()
    if is_packed(data):
        dataset = PackedDataset(data)
        total = min(len(dataset), limit) if limit else len(dataset)
        tick = progress(total, name) if progress is not None else None
        nll, tokens, chars = packed_nll(model, dataset, batch_size, limit, tokenizer, tick)
        return PerplexityResult(name, str(data), "packed", total, tokens, nll, chars)
    if tokenizer is None:
        raise CpmctlError(f"{name}: scoring raw text needs a vocabulary; pass --vocab FILE")
    texts = read_documents(data, limit)
    tick = progress(len(texts), name) if progress is not None else None
    nll, tokens, chars = raw_text_nll(model, tokenizer, texts, max_length, batch_size, tick)
    if tokens == 0:
        raise CpmctlError(f"{data}: no token of the documents is in the vocabulary")
    return PerplexityResult(name, str(data), "raw", len(texts), tokens, nll, chars)


def load_scoring_model(model_path: str | Path, vocab: str | Path | None, device: torch.device, dtype: torch.dtype,
                       need_vocab: bool):
    """A model and its tokenizer (None when no vocabulary is at hand and none is needed)."""
    from cpmctl.model.checkpoint import load_model, load_tokenizer, vocab_beside

    model, _ = load_model(model_path, device=device, dtype=dtype)
    if vocab is None and vocab_beside(model_path) is None and not need_vocab:
        return model, None
    return model, load_tokenizer(model_path, vocab, model.config.vocab_size)


def check_scoring_options(batch_size: int, max_length: int, limit: int | None) -> None:
    if batch_size < 1:
        raise CpmctlError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length < 34:
        raise CpmctlError(f"--max-length must leave room for text after 32 prompt slots and <s>, got {max_length}")
    if limit is not None and limit < 1:
        raise CpmctlError(f"--limit must be >= 1, got {limit}")


def perplexity(model_path: str | Path, data: str | Path, batch_size: int = 8, max_length: int = 1024,
               limit: int | None = None, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
               vocab: str | Path | None = None, progress: Callable[[int], Callable[[int], None]] | None = None
               ) -> PerplexityResult:
    """`cpmctl eval ppl`: perplexity and bits per character of one checkpoint."""
    check_scoring_options(batch_size, max_length, limit)
    if not Path(data).exists():
        raise CpmctlError(f"data not found: {data}")
    model, tokenizer = load_scoring_model(model_path, vocab, device, dtype, need_vocab=not is_packed(data))
    tick = (lambda total, _name: progress(total)) if progress is not None else None
    return model_perplexity(model, tokenizer, data, str(model_path), batch_size, max_length, limit, tick)
