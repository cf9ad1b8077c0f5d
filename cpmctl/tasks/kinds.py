"""The task kinds: generation, choice and ranking (shared/reference/cpm-ant.md section 10).

A task knows its data schema (cpmctl/tasks/schema.py), its prompt format and its scoring:
- prompt: the 32 prompt slots of `prompt_task_id` (segment 0), then `<s>` + the template filled with the example
  (segment 2, context True = given), then what the model must produce (segment 2, context False);
- training rows: those sequences as records of cpmctl/model/inputs.py, in the packed-row format, so the one
  training loop trains on them;
- scoring: generation metrics on decoded text; choice and ranking read the logit of "是" after the filled
  template (which ends in "[是否正确]"), as the original did. Metrics are cpmctl/tasks/metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedReader, RowsInMemory
from cpmctl.data.textio import read_jsonl
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import PROMPT_LENGTH, given_then_predicted, pack_in_order
from cpmctl.model.tokenizer import BOS, EOS, CPMAntTokenizer
from cpmctl.tasks import metrics as M
from cpmctl.tasks.schema import (
    SPLITS,
    ChoiceExample,
    Example,
    GenerationExample,
    RankingExample,
    optional_id,
    text_field,
)
from cpmctl.tasks.templates import check_template, fill_template

YES, NO = "是", "否"
CHOICE_SUFFIX = "[是否正确]"
MIN_INPUT_TOKENS = 8  # a max_length that leaves less room for the input is a configuration mistake


# ----- token sequences -----------------------------------------------------------------------------------------
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


# ----- tasks ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Common to every kind. Subclasses define the schema, the training sequences and scoring; predicting with a
    model is cpmctl/evaluate/predict.py."""

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
        """The token sequences one example trains on (one per option for choice tasks)."""
        raise NotImplementedError

    def to_rows(self, examples: Sequence[Example], tokenizer: CPMAntTokenizer, max_length: int | None = None,
                vocab_size: int | None = None, pack: bool = False) -> list[dict[str, np.ndarray]]:
        """Training rows (packed-row format) for `examples`; pack=True shares rows between short sequences."""
        max_length = max_length or self.max_length
        vocab_size = vocab_size or tokenizer.vocab_size
        records = [given_then_predicted(s.given, s.predicted, vocab_size, self.prompt_task_id)
                   for ex in examples for s in self.sequences(ex, tokenizer, max_length)]
        return pack_in_order(records, max_length, share_rows=pack)

    def reader(self, examples: Sequence[Example], tokenizer: CPMAntTokenizer, batch_size: int, max_length=None,
               vocab_size=None, seed: int = 0, rank: int = 0, world_size: int = 1, pack: bool = False) -> PackedReader:
        rows = self.to_rows(examples, tokenizer, max_length, vocab_size, pack)
        return PackedReader(RowsInMemory(rows, f"task {self.name}"), batch_size, seed, rank, world_size)

    # --- scoring ---
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


# --- generation ---
GENERATION_METRICS = ("rouge", "bleu", "distinct", "math", "exact_match", "char_f1")


@dataclass
class GenerationTask(Task):
    max_target_length: int = 64  # target tokens (with </s>) kept for training; the input is cut to leave room
    decode: GenerationConfig = field(default_factory=lambda: GenerationConfig("beam", beam_size=3, max_new_tokens=50))
    metrics: tuple[str, ...] = ("rouge",)

    kind: ClassVar[str] = "generation"
    schema: ClassVar[tuple[str, ...]] = ("input", "target")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.decode, dict):  # a custom task's YAML mapping: the defaults updated by its keys
            self.decode = GenerationConfig().updated(self.decode)
        self.decode.validate()
        if self.max_target_length < 2:
            raise CpmctlError(f"task {self.name}: max_target_length must be at least 2")
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if unknown:
            raise CpmctlError(f"task {self.name}: unknown metric '{unknown[0]}' (one of {', '.join(GENERATION_METRICS)})")

    def parse(self, obj, where, line):
        answer = obj.get(self.key("answer"))
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise CpmctlError(f"{where}: field '{self.key('answer')}' must be a string or a number")
        return GenerationExample(text_field(obj, self.key("input"), where), text_field(obj, self.key("target"), where),
                                 None if answer is None else str(answer), optional_id(obj, self.key("id"), where), line)

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


@dataclass
class ChoiceTask(Task):
    template: str = "{input}选项：{option}" + CHOICE_SUFFIX
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")

    kind: ClassVar[str] = "choice"
    schema: ClassVar[tuple[str, ...]] = ("input", "options", "label")
    template_fields: ClassVar[set[str]] = {"input", "option"}

    def parse(self, obj, where, line):
        text = text_field(obj, self.key("input"), where)
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
        return ChoiceExample(text, list(options), label, optional_id(obj, self.key("id"), where), line)

    def option_ids(self, example, option: str, tokenizer, max_length: int) -> list[int]:
        budget = max_length - PROMPT_LENGTH - 2  # <s> and the answer token
        values = {"input": example.input, "option": option}
        return [BOS] + fill_template(tokenizer, self.template, values, budget, self.truncate, self.keep)

    def sequences(self, example, tokenizer, max_length):
        yes, no = single_token(tokenizer, YES), single_token(tokenizer, NO)
        return [TrainingSequence(self.option_ids(example, o, tokenizer, max_length), [yes if j == example.label else no])
                for j, o in enumerate(example.options)]

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
        return RankingExample(text_field(obj, self.key("query"), where), text_field(obj, self.key("document"), where),
                              float(rel), optional_id(obj, self.key("qid"), where),
                              optional_id(obj, self.key("id"), where), line)

    def pair_ids(self, example, tokenizer, max_length: int) -> list[int]:
        budget = max_length - PROMPT_LENGTH - 2
        values = {"query": example.query, "document": example.document}
        return [BOS] + fill_template(tokenizer, self.template, values, budget, self.truncate, self.keep)

    def sequences(self, example, tokenizer, max_length):
        answer = single_token(tokenizer, YES if example.relevance > 0 else NO)
        return [TrainingSequence(self.pair_ids(example, tokenizer, max_length), [answer])]

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
