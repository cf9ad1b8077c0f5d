"""The task registry: the six CUGE tasks CPM-Ant was tuned and scored on, and user tasks defined in YAML.

A task knows four things (shared/reference/cpm-ant.md section 10):
- its data schema (jsonl): generation `{"input", "target"}`, choice `{"input", "options", "label"}`, ranking
  `{"query", "document", "relevance"}` (optional `"id"` on every kind, `"qid"` to group ranking pairs);
- its prompt format: 32 prompt slots of `prompt_task_id` (segment 0), then `<s>` + the template filled with the
  example (segment 2, context True = given), then what the model must produce (segment 2, context False);
- its decoding: beam search for generation tasks; option scoring for choice and ranking tasks, which reads the
  logit of "是" after the filled template (which ends in "[是否正确]"), as the original did;
- its metrics (cpmctl/evaluate/metrics.py).

Training rows come out in the packed-row format of cpmctl/data/packed.py so the one training loop trains on them;
`TaskReader` hands them out in batches like `PackedReader` (same exact state_dict / rank sharding).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cpmctl import CpmctlError
from cpmctl.data.packed import FIELDS, IGNORE, PackedReader
from cpmctl.evaluate import metrics as M
from cpmctl.model.tokenizer import BOS, EOS, CPMAntTokenizer

SPLITS = ("train", "dev", "test")
KINDS = ("generation", "choice", "ranking")
TEXT_SEGMENT = 2
LM_TASK = 2  # the `task` field of packed rows: the records are lm-style (next-token targets)
PROMPT_LENGTH = 32
YES, NO = "是", "否"
CHOICE_SUFFIX = "[是否正确]"
MIN_INPUT_TOKENS = 8  # a max_length that leaves less room for the input is a configuration mistake


# ----- examples ------------------------------------------------------------------------------------------------
@dataclass
class GenerationExample:
    input: str
    target: str
    answer: str | None = None  # Math23K: the numeric answer when the target is an equation
    id: str | None = None
    line: int = 0


@dataclass
class ChoiceExample:
    input: str
    options: list[str]
    label: int
    id: str | None = None
    line: int = 0


@dataclass
class RankingExample:
    query: str
    document: str
    relevance: float
    qid: str | None = None
    id: str | None = None
    line: int = 0

    @property
    def group(self) -> str:
        return self.qid if self.qid is not None else self.query


Example = GenerationExample | ChoiceExample | RankingExample


# ----- jsonl reading -------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a CpmctlError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CpmctlError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CpmctlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise CpmctlError(f"{path}: is a directory, expected a .jsonl file") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CpmctlError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CpmctlError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows


def _text(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise CpmctlError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise CpmctlError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise CpmctlError(f"{where}: field '{key}' is empty")
    return value


def _optional_id(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CpmctlError(f"{where}: field '{key}' must be a string or an integer")
    return str(value)


# ----- token sequences and rows --------------------------------------------------------------------------------
@dataclass
class TrainingSequence:
    """One training sequence of text tokens: `given` (context True) then `predicted` (context False)."""

    given: list[int]
    predicted: list[int]


def single_token(tokenizer: CPMAntTokenizer, text: str) -> int:
    ids = tokenizer.encode_for_model(text)
    if len(ids) != 1:
        raise CpmctlError(f"{tokenizer.path}: the vocabulary has no single token for '{text}' (option scoring needs it)")
    return ids[0]


def prompt_slots(vocab_size: int, prompt_task_id: int, prompt_length: int = PROMPT_LENGTH) -> list[int]:
    return [vocab_size + prompt_length * prompt_task_id + j for j in range(prompt_length)]


def build_row(
    sequences: Sequence[TrainingSequence], max_length: int, vocab_size: int, prompt_task_id: int,
    prompt_length: int = PROMPT_LENGTH,
) -> dict[str, np.ndarray]:
    """One packed row: each sequence = its own prompt slots + text, in its own span; right padding after."""
    row = {name: np.zeros(max_length, dtype=dtype) for name, dtype in FIELDS.items()}
    row["target"][:] = IGNORE
    row["task"][:] = -1
    pos = 0
    for span, seq in enumerate(sequences):
        ids = prompt_slots(vocab_size, prompt_task_id, prompt_length) + seq.given + seq.predicted
        n = len(ids)
        if pos + n > max_length:
            raise ValueError(f"sequences of {pos + n} tokens do not fit a row of {max_length}")
        given = prompt_length + len(seq.given)
        s = slice(pos, pos + n)
        row["input"][s] = ids
        row["segment"][s] = [0] * prompt_length + [TEXT_SEGMENT] * (n - prompt_length)
        row["context"][s] = [1] * given + [0] * len(seq.predicted)
        row["span"][s] = span
        row["task"][s] = LM_TASK
        # tgt[i] = token[i + 1] where token i + 1 is to be predicted.
        for i in range(given - 1, n - 1):
            row["target"][pos + i] = ids[i + 1]
        pos += n
    row["span"][pos:] = len(sequences)  # padding gets its own span: nothing sees it
    return row


def pack_rows(
    sequences: list[TrainingSequence], max_length: int, vocab_size: int, prompt_task_id: int, pack: bool,
    prompt_length: int = PROMPT_LENGTH,
) -> list[dict[str, np.ndarray]]:
    """One sequence per row, or (pack=True) consecutive sequences sharing rows in distinct spans."""
    rows, current, used = [], [], 0
    for seq in sequences:
        n = prompt_length + len(seq.given) + len(seq.predicted)
        if current and (not pack or used + n > max_length):
            rows.append(build_row(current, max_length, vocab_size, prompt_task_id, prompt_length))
            current, used = [], 0
        current.append(seq)
        used += n
    if current:
        rows.append(build_row(current, max_length, vocab_size, prompt_task_id, prompt_length))
    return rows


class RowsDataset:
    """In-memory rows with the PackedDataset interface (`len`, `rows(index)`), for PackedReader."""

    def __init__(self, rows: list[dict[str, np.ndarray]], name: str = "task rows"):
        if not rows:
            raise CpmctlError(f"{name}: no training rows")
        self.path = name
        self.arrays = {k: np.stack([r[k] for r in rows]) for k in FIELDS}
        self.num_rows, self.max_length = self.arrays["input"].shape

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, index) -> dict[str, np.ndarray]:
        return {k: a[index] for k, a in self.arrays.items()}


class TaskReader(PackedReader):
    """Batches of task rows: next_batch / state_dict / load_state_dict / rank sharding exactly as PackedReader."""

    def __init__(self, rows: list[dict[str, np.ndarray]], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, name: str = "task rows"):
        super().__init__(RowsDataset(rows, name), batch_size, seed, rank, world_size, shuffle)


# ----- templates -----------------------------------------------------------------------------------------------
def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_template(template: str, allowed: set[str], required: set[str], where: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise CpmctlError(f"{where}: bad template {template!r} ({e})") from None
    unknown = [f for f in fields if f not in allowed]
    if unknown:
        raise CpmctlError(f"{where}: template field '{{{unknown[0]}}}' is not one of {sorted(allowed)}")
    missing = sorted(required - set(fields))
    if missing:
        raise CpmctlError(f"{where}: template must contain '{{{missing[0]}}}'")


def fill_template(tokenizer: CPMAntTokenizer, template: str, values: dict[str, str], budget: int,
                  truncate: str, keep: str) -> list[int]:
    """Token ids of the filled template within `budget` tokens. Each literal and value is encoded on its own, so
    only the `truncate` value is cut (keep 'head' or 'tail') and the template's own words always survive."""
    parts: list[tuple[str | None, list[int]]] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append((None, tokenizer.encode_for_model(literal)))
        if name is not None:
            parts.append((name, tokenizer.encode_for_model(values[name])))
    total = sum(len(ids) for _, ids in parts)
    if total > budget:
        excess = total - budget
        for i, (name, ids) in enumerate(parts):
            if name == truncate:
                keep_n = max(len(ids) - excess, 0)
                parts[i] = (name, ids[:keep_n] if keep == "head" else ids[len(ids) - keep_n :])
                excess -= len(ids) - keep_n
                break
        if excess > 0:  # the template alone is longer than the budget: cut from the end
            flat = [t for _, ids in parts for t in ids]
            return flat[:budget]
    return [t for _, ids in parts for t in ids]


# ----- tasks ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Common to every kind. Subclasses define the schema, sequences, prediction and scoring."""

    name: str
    description: str = ""
    template: str = "{input}"
    prompt_task_id: int = 2
    max_length: int = 256
    truncate: str = "input"  # which template field is cut when an example is too long
    keep: str = "head"  # keep the head or the tail of the cut field
    fields: dict[str, str] = field(default_factory=dict)  # schema name -> jsonl key (custom data)
    metrics: tuple[str, ...] = ()

    kind: ClassVar[str] = ""
    schema: ClassVar[tuple[str, ...]] = ()
    template_fields: ClassVar[set[str]] = {"input"}

    def __post_init__(self):
        check_template(self.template, self.template_fields, self.template_fields, f"task {self.name}")
        if self.truncate not in self.template_fields:
            raise CpmctlError(f"task {self.name}: truncate must be one of {sorted(self.template_fields)}")
        if self.keep not in ("head", "tail"):
            raise CpmctlError(f"task {self.name}: keep must be 'head' or 'tail', got {self.keep!r}")
        if self.max_length < PROMPT_LENGTH + MIN_INPUT_TOKENS + 2:
            raise CpmctlError(f"task {self.name}: max_length must be at least {PROMPT_LENGTH + MIN_INPUT_TOKENS + 2}")

    def key(self, name: str) -> str:
        return self.fields.get(name, name)

    # --- data ---
    def load(self, path: str | Path) -> list[Example]:
        """Examples of one jsonl file, validated; errors name file:line and the field."""
        path = Path(path)
        examples = [self.parse(obj, f"{path}:{n}", n) for n, obj in read_jsonl(path)]
        if not examples:
            raise CpmctlError(f"{path}: no examples")
        return examples

    def load_split(self, data: str | Path, split: str) -> list[Example]:
        """`data` is a directory with train/dev/test.jsonl, or one jsonl file (used whatever the split)."""
        data = Path(data)
        if split not in SPLITS:
            raise CpmctlError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        if data.is_dir():
            path = data / f"{split}.jsonl"
            if not path.exists():
                raise CpmctlError(f"{data}: no {split}.jsonl (a task directory holds train.jsonl, dev.jsonl, test.jsonl)")
            return self.load(path)
        if not data.exists():
            raise CpmctlError(f"data not found: {data}")
        return self.load(data)

    def parse(self, obj: dict, where: str, line: int) -> Example:
        raise NotImplementedError

    # --- training rows ---
    def sequences(self, example: Example, tokenizer: CPMAntTokenizer, max_length: int) -> list[TrainingSequence]:
        raise NotImplementedError

    def to_rows(self, examples: Sequence[Example], tokenizer: CPMAntTokenizer, max_length: int | None = None,
                vocab_size: int | None = None, pack: bool = False) -> list[dict[str, np.ndarray]]:
        """Training rows (packed-row format) for `examples`; pack=True shares rows between short sequences."""
        max_length = max_length or self.max_length
        vocab_size = vocab_size or tokenizer.vocab_size
        seqs = [s for ex in examples for s in self.sequences(ex, tokenizer, max_length)]
        return pack_rows(seqs, max_length, vocab_size, self.prompt_task_id, pack)

    def reader(self, examples: Sequence[Example], tokenizer: CPMAntTokenizer, batch_size: int, max_length=None,
               vocab_size=None, seed: int = 0, rank: int = 0, world_size: int = 1, pack: bool = False) -> TaskReader:
        rows = self.to_rows(examples, tokenizer, max_length, vocab_size, pack)
        return TaskReader(rows, batch_size, seed, rank, world_size, name=f"task {self.name}")

    # --- inference and scoring ---
    def predict(self, model, tokenizer, examples, batch_size: int = 8, device=None,
                progress: Callable[[int], None] | None = None, **decode) -> list:
        raise NotImplementedError

    def parse_prediction(self, value: Any, example: Example, where: str):
        """A prediction read from a file, checked against its example."""
        raise NotImplementedError

    def prediction_record(self, prediction, example: Example) -> dict:
        record = {"prediction": prediction}
        if example.id is not None:
            record = {"id": example.id, **record}
        return record

    def score(self, predictions: Sequence, examples: Sequence[Example]) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "schema": list(self.schema),
                "template": self.template, "prompt_task_id": self.prompt_task_id, "max_length": self.max_length,
                "metrics": list(self.metrics)}


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _check_vocab(model, tokenizer: CPMAntTokenizer) -> None:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CpmctlError(f"vocab has {tokenizer.vocab_size} tokens but the model expects {model.config.vocab_size}")


# --- generation ---
GENERATION_METRICS = ("rouge", "bleu", "distinct", "math", "exact_match", "char_f1")


@dataclass
class GenerationTask(Task):
    max_target_length: int = 64  # target tokens (with </s>) kept for training; the input is cut to leave room
    decode: dict = field(default_factory=lambda: {"decode": "beam", "beam_size": 3, "max_new_tokens": 50})
    metrics: tuple[str, ...] = ("rouge",)

    kind: ClassVar[str] = "generation"
    schema: ClassVar[tuple[str, ...]] = ("input", "target")

    def __post_init__(self):
        super().__post_init__()
        if self.max_target_length < 2:
            raise CpmctlError(f"task {self.name}: max_target_length must be at least 2")
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if unknown:
            raise CpmctlError(f"task {self.name}: unknown metric '{unknown[0]}' (one of {', '.join(GENERATION_METRICS)})")

    def parse(self, obj, where, line):
        answer = obj.get(self.key("answer"))
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise CpmctlError(f"{where}: field '{self.key('answer')}' must be a string or a number")
        return GenerationExample(_text(obj, self.key("input"), where), _text(obj, self.key("target"), where),
                                 None if answer is None else str(answer), _optional_id(obj, self.key("id"), where), line)

    def given_ids(self, example_input: str, tokenizer, max_length: int) -> list[int]:
        budget = max_length - PROMPT_LENGTH - 1 - self.max_target_length
        if budget < MIN_INPUT_TOKENS:
            raise CpmctlError(
                f"task {self.name}: max_length {max_length} leaves {budget} input tokens after the {PROMPT_LENGTH} "
                f"prompt slots and max_target_length {self.max_target_length}; raise max_length"
            )
        return [BOS] + fill_template(tokenizer, self.template, {"input": example_input}, budget, self.truncate, self.keep)

    def sequences(self, example, tokenizer, max_length):
        target = (tokenizer.encode_for_model(example.target) + [EOS])[: self.max_target_length]
        return [TrainingSequence(self.given_ids(example.input, tokenizer, max_length), target)]

    def predict(self, model, tokenizer, examples, batch_size=8, device=None, progress=None, **decode):
        from cpmctl.generate.decode import GenerationConfig, beam_search, build_inputs, greedy, sample

        _check_vocab(model, tokenizer)
        cfg = GenerationConfig(**{**self.decode, **{k: v for k, v in decode.items() if v is not None}})
        cfg.validate()
        device = device or _model_device(model)
        given = [self.given_ids(ex.input, tokenizer, self.max_length) for ex in examples]
        # Similar lengths decode together (less left padding); results go back to the input order.
        order = sorted(range(len(given)), key=lambda i: len(given[i]))
        out: list[str | None] = [None] * len(given)
        run = {"beam": beam_search, "greedy": greedy, "sample": sample}[cfg.decode]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = build_inputs(model, [given[i] for i in idx], task_id=self.prompt_task_id, device=device)
            for i, ids in zip(idx, run(model, inputs, cfg)):
                out[i] = tokenizer.decode(ids)
            if progress is not None:
                progress(len(idx))
        return out

    def parse_prediction(self, value, example, where):
        if not isinstance(value, str):
            raise CpmctlError(f"{where}: 'prediction' must be a string for task {self.name}")
        return value

    def references(self, examples) -> list[str]:
        return [ex.target for ex in examples]

    def score(self, predictions, examples):
        _check_counts(predictions, examples)
        refs = self.references(examples)
        result: dict[str, float] = {}
        for metric in self.metrics:
            if metric == "rouge":
                result.update(M.rouge(predictions, refs))
            elif metric == "bleu":
                result.update(M.bleu(predictions, refs))
            elif metric == "distinct":
                result["distinct-1"] = M.distinct(predictions, 1)
                result["distinct-2"] = M.distinct(predictions, 2)
            elif metric == "math":
                answers = [ex.answer if ex.answer is not None else ex.target for ex in examples]
                result["accuracy"] = M.math_accuracy(predictions, answers)
            elif metric == "exact_match":
                result["exact_match"] = M.exact_match(predictions, refs)
            elif metric == "char_f1":
                result["char_f1"] = 100.0 * sum(M.char_f1(p, r) for p, r in zip(predictions, refs)) / len(refs)
        result["empty_predictions"] = sum(not p.strip() for p in predictions)
        return result


# --- option scoring (choice and ranking) ---
@torch.no_grad()
def yes_logits(model, tokenizer, token_lists: list[list[int]], prompt_task_id: int, batch_size: int,
               device=None, progress: Callable[[int], None] | None = None) -> list[float]:
    """The logit of "是" after each given sequence (which ends in "[是否正确]"), batched."""
    from cpmctl.generate.decode import build_inputs

    _check_vocab(model, tokenizer)
    yes = single_token(tokenizer, YES)
    device = device or _model_device(model)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    scores = [0.0] * len(token_lists)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = build_inputs(model, [token_lists[i] for i in idx], task_id=prompt_task_id, device=device)
        logits = model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"], last_only=True)
        for i, value in zip(idx, logits[:, -1, yes].float().tolist()):
            scores[i] = value
        if progress is not None:
            progress(len(idx))
    return scores


@dataclass
class ChoiceTask(Task):
    template: str = "{input}选项：{option}" + CHOICE_SUFFIX
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")

    kind: ClassVar[str] = "choice"
    schema: ClassVar[tuple[str, ...]] = ("input", "options", "label")
    template_fields: ClassVar[set[str]] = {"input", "option"}

    def parse(self, obj, where, line):
        text = _text(obj, self.key("input"), where)
        key = self.key("options")
        options = obj.get(key)
        if options is None:
            raise CpmctlError(f"{where}: missing field '{key}'")
        if not isinstance(options, list) or len(options) < 2:
            raise CpmctlError(f"{where}: field '{key}' must be a list of at least 2 options")
        for j, o in enumerate(options):
            if not isinstance(o, str) or not o.strip():
                raise CpmctlError(f"{where}: option {j} must be a non-empty string")
        key = self.key("label")
        if key not in obj:
            raise CpmctlError(f"{where}: missing field '{key}'")
        label = obj[key]
        if isinstance(label, bool) or not isinstance(label, int):
            raise CpmctlError(f"{where}: field '{key}' must be an integer option index, got {label!r}")
        if not 0 <= label < len(options):
            raise CpmctlError(f"{where}: label {label} out of range for {len(options)} options (0..{len(options) - 1})")
        return ChoiceExample(text, list(options), label, _optional_id(obj, self.key("id"), where), line)

    def option_ids(self, example, option: str, tokenizer, max_length: int) -> list[int]:
        budget = max_length - PROMPT_LENGTH - 2  # <s> and the answer token
        values = {"input": example.input, "option": option}
        return [BOS] + fill_template(tokenizer, self.template, values, budget, self.truncate, self.keep)

    def sequences(self, example, tokenizer, max_length):
        yes, no = single_token(tokenizer, YES), single_token(tokenizer, NO)
        return [TrainingSequence(self.option_ids(example, o, tokenizer, max_length), [yes if j == example.label else no])
                for j, o in enumerate(example.options)]

    def option_scores(self, model, tokenizer, examples, batch_size=8, device=None, progress=None) -> list[list[float]]:
        lists, owner = [], []
        for e, ex in enumerate(examples):
            for o in ex.options:
                lists.append(self.option_ids(ex, o, tokenizer, self.max_length))
                owner.append(e)
        flat = yes_logits(model, tokenizer, lists, self.prompt_task_id, batch_size, device, progress)
        scores: list[list[float]] = [[] for _ in examples]
        for e, s in zip(owner, flat):
            scores[e].append(s)
        return scores

    def predict(self, model, tokenizer, examples, batch_size=8, device=None, progress=None, **decode):
        scores = self.option_scores(model, tokenizer, examples, batch_size, device, progress)
        return [int(np.argmax(s)) for s in scores]

    def parse_prediction(self, value, example, where):
        """An option index, or the text of one of the options."""
        if isinstance(value, str) and value in example.options:
            return example.options.index(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CpmctlError(f"{where}: 'prediction' must be an option index or the text of an option, got {value!r}")
        if not 0 <= value < len(example.options):
            raise CpmctlError(f"{where}: prediction {value} out of range for {len(example.options)} options")
        return value

    def score(self, predictions, examples):
        _check_counts(predictions, examples)
        labels = [ex.label for ex in examples]
        result = {"accuracy": M.accuracy(predictions, labels)}
        if "macro_f1" in self.metrics:
            result["macro_f1"] = M.macro_f1(predictions, labels)
        return result


@dataclass
class RankingTask(Task):
    template: str = "查询：{query}文档：{document}" + CHOICE_SUFFIX
    truncate: str = "document"
    ks: tuple[int, ...] = (1, 5, 10)
    metrics: tuple[str, ...] = ("mrr", "ndcg")

    kind: ClassVar[str] = "ranking"
    schema: ClassVar[tuple[str, ...]] = ("query", "document", "relevance")
    template_fields: ClassVar[set[str]] = {"query", "document"}

    def parse(self, obj, where, line):
        key = self.key("relevance")
        if key not in obj:
            raise CpmctlError(f"{where}: missing field '{key}'")
        rel = obj[key]
        if isinstance(rel, bool) or not isinstance(rel, (int, float)) or rel < 0:
            raise CpmctlError(f"{where}: field '{key}' must be a number >= 0, got {rel!r}")
        return RankingExample(_text(obj, self.key("query"), where), _text(obj, self.key("document"), where),
                              float(rel), _optional_id(obj, self.key("qid"), where),
                              _optional_id(obj, self.key("id"), where), line)

    def pair_ids(self, example, tokenizer, max_length: int) -> list[int]:
        budget = max_length - PROMPT_LENGTH - 2
        values = {"query": example.query, "document": example.document}
        return [BOS] + fill_template(tokenizer, self.template, values, budget, self.truncate, self.keep)

    def sequences(self, example, tokenizer, max_length):
        answer = single_token(tokenizer, YES if example.relevance > 0 else NO)
        return [TrainingSequence(self.pair_ids(example, tokenizer, max_length), [answer])]

    def predict(self, model, tokenizer, examples, batch_size=8, device=None, progress=None, **decode):
        lists = [self.pair_ids(ex, tokenizer, self.max_length) for ex in examples]
        return yes_logits(model, tokenizer, lists, self.prompt_task_id, batch_size, device, progress)

    def parse_prediction(self, value, example, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CpmctlError(f"{where}: 'prediction' must be a relevance score (a number), got {value!r}")
        return float(value)

    def score(self, predictions, examples):
        _check_counts(predictions, examples)
        groups: dict[str, tuple[list[float], list[float]]] = {}
        for p, ex in zip(predictions, examples):
            scores, rels = groups.setdefault(ex.group, ([], []))
            scores.append(p)
            rels.append(ex.relevance)
        try:
            return M.ranking(list(groups.values()), self.ks)
        except ValueError as e:
            raise CpmctlError(f"task {self.name}: {e}") from None


def _check_counts(predictions, examples) -> None:
    if not predictions:
        raise CpmctlError("no predictions to score")
    if len(predictions) != len(examples):
        raise CpmctlError(f"{len(predictions)} predictions for {len(examples)} examples")


# ----- the registry --------------------------------------------------------------------------------------------
def _builtin() -> dict[str, Task]:
    tasks = [
        ChoiceTask("ccpm", "classical poetry matching: pick the line of poetry a modern Chinese sentence describes",
                   template="{input}对应的诗句：{option}" + CHOICE_SUFFIX),
        ChoiceTask("c3", "free-form multiple-choice reading comprehension (passage and question in input)",
                   template="{input}答案：{option}" + CHOICE_SUFFIX, max_length=512, keep="tail"),
        RankingTask("sogou-log", "query-document relevance ranking from search logs"),
        GenerationTask("lcsts", "short-text summarization", template="{input}摘要：", metrics=("rouge",),
                       max_target_length=64, decode={"decode": "beam", "beam_size": 3, "max_new_tokens": 50}),
        GenerationTask("kdconv", "knowledge-grounded multi-turn dialogue (knowledge and history in input)",
                       template="{input}回复：", keep="tail", metrics=("bleu", "distinct"), max_length=512,
                       decode={"decode": "beam", "beam_size": 3, "max_new_tokens": 50, "repetition_penalty": 1.2}),
        GenerationTask("math23k", "math word problems: generate the equation x=...; scored on its value",
                       template="{input}列式：", metrics=("math",), max_target_length=48,
                       decode={"decode": "greedy", "max_new_tokens": 48}),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _builtin()
TASK_CLASSES = {"generation": GenerationTask, "choice": ChoiceTask, "ranking": RankingTask}
CUSTOM_KEYS = {"name", "kind", "description", "template", "prompt_task_id", "max_length", "truncate", "keep",
               "fields", "metrics", "max_target_length", "decode", "ks"}


def task_names() -> list[str]:
    return list(TASKS) + ["custom"]


def load_custom_task(path: str | Path) -> Task:
    """A user task from YAML: kind, template and metrics (see docs/tasks.md)."""
    from cpmctl.recipe import load_yaml

    path = Path(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - CUSTOM_KEYS)
    if unknown:
        raise CpmctlError(f"{path}: unknown task key '{unknown[0]}' (known: {', '.join(sorted(CUSTOM_KEYS))})")
    kind = data.get("kind")
    if kind not in TASK_CLASSES:
        raise CpmctlError(f"{path}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    cls = TASK_CLASSES[kind]
    kwargs = {k: v for k, v in data.items() if k != "kind"}
    kwargs.setdefault("name", path.stem)
    if not isinstance(kwargs["name"], str) or not kwargs["name"]:
        raise CpmctlError(f"{path}: key 'name' must be a non-empty string")
    for key, types, what in (("template", str, "a string"), ("description", str, "a string"),
                             ("prompt_task_id", int, "an integer"), ("max_length", int, "an integer"),
                             ("max_target_length", int, "an integer"), ("fields", dict, "a mapping"),
                             ("decode", dict, "a mapping"), ("metrics", list, "a list"), ("ks", list, "a list"),
                             ("truncate", str, "a string"), ("keep", str, "a string")):
        if key in kwargs and (not isinstance(kwargs[key], types) or isinstance(kwargs[key], bool)):
            raise CpmctlError(f"{path}: key '{key}' must be {what}")
    if "max_target_length" in kwargs and kind != "generation":
        raise CpmctlError(f"{path}: key 'max_target_length' is for generation tasks only")
    if "decode" in kwargs and kind != "generation":
        raise CpmctlError(f"{path}: key 'decode' is for generation tasks only")
    if "ks" in kwargs and kind != "ranking":
        raise CpmctlError(f"{path}: key 'ks' is for ranking tasks only")
    if "prompt_task_id" in kwargs and not 0 <= kwargs["prompt_task_id"] < 32:
        raise CpmctlError(f"{path}: key 'prompt_task_id' must be in 0..31")
    for k in ("metrics", "ks"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if "decode" in kwargs:
        from cpmctl.generate.decode import GenerationConfig

        known = set(GenerationConfig.__dataclass_fields__)
        bad = sorted(set(kwargs["decode"]) - known)
        if bad:
            raise CpmctlError(f"{path}: unknown decode key '{bad[0]}' (known: {', '.join(sorted(known))})")
        GenerationConfig(**kwargs["decode"]).validate()
    try:
        return cls(**kwargs)
    except CpmctlError as e:
        raise CpmctlError(f"{path}: {e}") from None


def get_task(name: str, definition: str | Path | None = None) -> Task:
    """A registered task by name, or `custom` with a YAML definition (a .yaml path given as the name also works)."""
    if name == "custom" or name.endswith((".yaml", ".yml")):
        path = definition if name == "custom" else name
        if path is None:
            raise CpmctlError("--task custom needs a task definition: --task-def FILE.yaml")
        if not Path(path).exists():
            raise CpmctlError(f"task definition not found: {path}")
        return load_custom_task(path)
    if name not in TASKS:
        raise CpmctlError(f"unknown task '{name}' (one of {', '.join(task_names())})")
    return TASKS[name]
