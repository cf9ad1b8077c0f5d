"""The task registry: schemas and their errors, prompt formatting into packed rows, option scoring, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from cpmctl import CpmctlError
from cpmctl.data.packed_format import to_batch
from cpmctl.model.inputs import IGNORE
from cpmctl.model.ant import build_model
from cpmctl.model.tokenizer import BOS, EOS, CPMAntTokenizer
from cpmctl import tasks as T
from cpmctl.evaluate.predict import option_scores, predict

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
TASK_VOCAB = FIXTURES / "vocab.txt"
COUNTS = {"ccpm": (5, 3, 4), "c3": (4, 2, 3), "sogou-log": (5, 3, 7), "lcsts": (4, 2, 3), "kdconv": (4, 2, 3),
          "math23k": (4, 2, 3)}


@pytest.fixture(scope="module")
def tok() -> CPMAntTokenizer:
    return CPMAntTokenizer(TASK_VOCAB)


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tiny_config(tok.vocab_size), seed=0).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ----- registry and schemas ------------------------------------------------------------------------------------
def test_registry_has_the_six_tasks_with_their_kinds():
    kinds = {name: task.kind for name, task in T.TASKS.items()}
    assert kinds == {"ccpm": "choice", "c3": "choice", "sogou-log": "ranking", "lcsts": "generation",
                     "kdconv": "generation", "math23k": "generation"}
    assert "custom" in T.task_names()
    with pytest.raises(CpmctlError, match="unknown task 'cmrc'"):
        T.get_task("cmrc", template="cpmctl")


@pytest.mark.parametrize("name", list(COUNTS))
def test_fixtures_load(name):
    task = T.get_task(name, template="cpmctl")
    for split, n in zip(T.SPLITS, COUNTS[name]):
        examples = task.load_split(FIXTURES / name, split)
        assert len(examples) == n
        assert all(ex.line >= 1 for ex in examples)


def test_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    with pytest.raises(CpmctlError, match="no dev.jsonl"):
        T.get_task("lcsts", template="cpmctl").load_split(tmp_path, "dev")


@pytest.mark.parametrize(
    "task, rows, message",
    [
        ("lcsts", [{"input": "a", "target": "b"}, "{not json"], r"bad.jsonl:2: not valid JSON"),
        ("lcsts", [{"input": "a", "target": "b"}, {"input": "a"}], r"bad.jsonl:2: missing field 'target'"),
        ("lcsts", [{"input": "a", "target": ""}], r"bad.jsonl:1: field 'target' is empty"),
        ("lcsts", [["a", "b"]], r"bad.jsonl:1: expected an object, got list"),
        ("ccpm", [{"input": "a", "options": ["x", "y"], "label": 2}], r"bad.jsonl:1: label 2 out of range for 2"),
        ("ccpm", [{"input": "a", "options": ["x", "y"], "label": "0"}], r"bad.jsonl:1: field 'label' must be an integer"),
        ("ccpm", [{"input": "a", "options": ["x"], "label": 0}], r"at least 2 options"),
        ("ccpm", [{"input": "a", "options": ["x", ""], "label": 0}], r"option 1 must be a non-empty string"),
        ("sogou-log", [{"query": "q", "document": "d", "relevance": -1}], r"'relevance' must be a number >= 0"),
        ("sogou-log", [{"query": "q", "relevance": 1}], r"missing field 'document'"),
        ("lcsts", [], r"no examples"),
    ],
)
def test_malformed_examples_name_the_line(tmp_path, task, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CpmctlError, match=message):
        T.get_task(task, template="cpmctl").load(path)


# ----- rows ----------------------------------------------------------------------------------------------------
def test_generation_row_layout(tok):
    task = T.get_task("lcsts", template="cpmctl")
    ex = task.load_split(FIXTURES / "lcsts", "train")[0]
    (row,) = task.to_rows([ex], tok, max_length=192)  # room for the input and max_target_length (64)
    # The template's literal and the example's text are encoded apart (only the text is ever cut).
    given = [BOS] + tok.encode_for_model(ex.input) + tok.encode_for_model("摘要：")
    target = tok.encode_for_model(ex.target) + [EOS]
    n = 32 + len(given) + len(target)
    v = tok.vocab_size
    assert row["input"][:32].tolist() == [v + 32 * 2 + j for j in range(32)]  # prompt slots of task 2
    assert row["input"][32:n].tolist() == given + target
    assert row["segment"][:32].tolist() == [0] * 32 and set(row["segment"][32:n].tolist()) == {2}
    # Given tokens are context, the target is to be predicted; targets are the next tokens of the target part.
    assert row["context"][: 32 + len(given)].all() and not row["context"][32 + len(given) : n].any()
    expect = np.full(192, IGNORE)
    expect[32 + len(given) - 1 : n - 1] = target
    np.testing.assert_array_equal(row["target"], expect)
    assert (row["span"][:n] == 0).all() and (row["span"][n:] == 1).all()
    assert (row["task"][:n] == 2).all() and (row["task"][n:] == -1).all()
    assert (row["input"][n:] == 0).all() and not row["context"][n:].any()


def test_long_input_is_truncated_but_template_and_target_survive(tok):
    task = T.get_task("lcsts", template="cpmctl")
    ex = T.GenerationExample(input="今天天气不错" * 50, target="天气不错")
    (seq,) = task.sequences(ex, tok, 128)
    assert 32 + len(seq.given) == 128 - task.max_target_length
    assert seq.given[-2:] == tok.encode_for_model("摘要：")[-2:]
    assert seq.predicted == tok.encode_for_model("天气不错") + [EOS]
    with pytest.raises(CpmctlError, match="max_length 96 leaves -1 input tokens"):
        task.sequences(ex, tok, 96)


def test_choice_rows_one_per_option(tok):
    task = T.get_task("ccpm", template="cpmctl")
    ex = task.load_split(FIXTURES / "ccpm", "train")[1]  # label 1
    rows = task.to_rows([ex], tok, max_length=96)
    assert len(rows) == 4
    yes, no = T.single_token(tok, "是"), T.single_token(tok, "否")
    answers = [int(r["target"][r["target"] != IGNORE][0]) for r in rows]
    assert answers == [no, yes, no, no]
    for r in rows:  # the filled template ends in [是否正确] and the answer is the only predicted token
        given = r["input"][r["context"].astype(bool)].tolist()
        assert tok.decode(given[32:]).endswith("[是否正确]")
        real = r["task"] != -1
        assert (r["context"][real] == 0).sum() == 1


def test_ranking_rows_answer_by_relevance(tok):
    task = T.get_task("sogou-log", template="cpmctl")
    examples = task.load_split(FIXTURES / "sogou-log", "train")
    rows = task.to_rows(examples, tok, max_length=128)
    yes = T.single_token(tok, "是")
    got = [int(r["target"][r["target"] != IGNORE][0]) == yes for r in rows]
    assert got == [ex.relevance > 0 for ex in examples]


def test_packed_rows_give_the_same_logits_as_one_sequence_per_row(tok, model):
    task = T.get_task("ccpm", template="cpmctl")
    examples = task.load_split(FIXTURES / "ccpm", "train")
    single = task.to_rows(examples, tok, max_length=128)
    packed = task.to_rows(examples, tok, max_length=128, pack=True)
    assert len(packed) < len(single)
    assert set(np.unique(packed[0]["span"]).tolist()) >= {0, 1}

    def target_logits(rows):
        batch = to_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        with torch.no_grad():
            logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])
        return logits[batch["target"] != IGNORE]

    torch.testing.assert_close(target_logits(packed), target_logits(single), rtol=1e-4, atol=1e-4)


def test_task_reader_resumes_exactly(tok):
    task = T.get_task("c3", template="cpmctl")
    examples = task.load_split(FIXTURES / "c3", "train")
    reader = task.reader(examples, tok, batch_size=3, max_length=128, seed=5)
    reader.next_batch()
    state = reader.state_dict()
    expected = [reader.next_batch()["input"] for _ in range(4)]
    resumed = task.reader(examples, tok, batch_size=3, max_length=128, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()["input"], want)
    # Two ranks split each global batch without overlap.
    r0 = task.reader(examples, tok, batch_size=2, max_length=128, seed=1, rank=0, world_size=2)
    r1 = task.reader(examples, tok, batch_size=2, max_length=128, seed=1, rank=1, world_size=2)
    a, b = r0.next_rows()["input"], r1.next_rows()["input"]
    assert not any((x == y).all() for x in a for y in b)


# ----- prediction ----------------------------------------------------------------------------------------------
def test_option_scores_read_the_logit_the_training_row_trains(tok, model):
    """The logit of 是 that option scoring reads is the one at the position whose training target is 是/否."""
    task = T.get_task("ccpm", template="cpmctl")
    ex = task.load_split(FIXTURES / "ccpm", "test")[0]
    scores = option_scores(task, model, tok, [ex], batch_size=3)[0]
    rows = task.to_rows([ex], tok, max_length=96)
    batch = to_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    with torch.no_grad():
        logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])
    at = (batch["target"] != IGNORE).nonzero()
    yes = T.single_token(tok, "是")
    want = [logits[i, j, yes].item() for i, j in at.tolist()]
    assert scores == pytest.approx(want, abs=1e-4)
    assert predict(task, model, tok, [ex], batch_size=2) == [int(np.argmax(want))]


def test_generation_predictions_do_not_depend_on_batching(tok, model):
    task = T.get_task("kdconv", template="cpmctl")
    examples = task.load_split(FIXTURES / "kdconv", "test")
    one = predict(task, model, tok, examples, batch_size=1, decode="greedy", max_new_tokens=6)
    three = predict(task, model, tok, examples, batch_size=3, decode="greedy", max_new_tokens=6)
    assert one == three and all(isinstance(p, str) and p for p in one)
    beam = predict(task, model, tok, examples[:2], batch_size=2, max_new_tokens=4)  # the task default: beam 3
    assert len(beam) == 2


def test_ranking_predictions_and_score(tok, model):
    task = T.get_task("sogou-log", template="cpmctl")
    examples = task.load_split(FIXTURES / "sogou-log", "test")
    preds = predict(task, model, tok, examples, batch_size=4)
    assert len(preds) == len(examples) and all(isinstance(p, float) for p in preds)
    # Scoring the gold relevances as predictions is a perfect ranking.
    perfect = task.score([ex.relevance for ex in examples], examples)
    assert perfect["mrr"] == 100.0 and perfect["ndcg@10"] == pytest.approx(100.0) and perfect["queries"] == 2


def test_score_checks_counts():
    task = T.get_task("lcsts", template="cpmctl")
    examples = task.load_split(FIXTURES / "lcsts", "test")
    with pytest.raises(CpmctlError, match="2 predictions for 3 examples"):
        task.score(["a", "b"], examples)
    assert task.score([ex.target for ex in examples], examples)["rouge-l"] == pytest.approx(100.0)


def test_vocab_without_answer_tokens_is_refused(tiny_vocab):
    tok = CPMAntTokenizer(tiny_vocab)  # has 是 but not 否
    task = T.get_task("ccpm", template="cpmctl")
    ex = task.load_split(FIXTURES / "ccpm", "train")[:1]
    with pytest.raises(CpmctlError, match="no single token for '否'"):
        task.to_rows(ex, tok, max_length=96)


# ----- custom tasks --------------------------------------------------------------------------------------------
def test_custom_task_from_yaml(tok):
    task = T.get_task("custom", FIXTURES / "custom" / "headline.yaml")
    assert task.name == "headline" and task.kind == "generation"
    examples = task.load_split(FIXTURES / "custom", "test")
    assert examples[0].target == "新儿童公园今天开放"  # read from the 'title' field
    (row,) = task.to_rows(examples[:1], tok)
    assert row["input"].shape == (128,)
    metrics = task.score([ex.target for ex in examples], examples)
    assert metrics["rouge-l"] == pytest.approx(100.0) and metrics["char_f1"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: regression\n", "'kind' must be one of"),
        ("kind: generation\ntemplat: x\n", "unknown task key 'templat'"),
        ("kind: generation\ntemplate: 'no field'\n", "template must contain '{input}'"),
        ("kind: choice\ntemplate: '{input}{answer}'\n", "template field '{answer}'"),
        ("kind: generation\nmetrics: [rouge, meteor]\n", "unknown metric 'meteor'"),
        ("kind: generation\ndecode: {beam: 3}\n", "unknown decode key 'beam'"),
        ("kind: choice\ndecode: {decode: beam}\n", "'decode' is for generation tasks only"),
        ("kind: generation\nmax_length: 10\n", "max_length must be at least"),
    ],
)
def test_custom_task_errors(tmp_path, text, message):
    path = tmp_path / "task.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CpmctlError, match=message):
        T.get_task("custom", path)
    with pytest.raises(CpmctlError, match="needs a task definition"):
        T.get_task("custom", template="cpmctl")


# ----- template: original ---------------------------------------------------------------------------------------
# The inputs CPM-Live's examples build (examples/tune.py, examples/infer.py), written out here from their rules:
# prompt ids arange(32) + 32 * task_id with task_id 1, then [<s>] + encode(input) [+ encode(option) +
# encode("[是否正确]")] [+ encode(target) + [</s>] to predict]; segment 0 for the prompt, 2 for the rest.
def original_generation_input(tok, text, target):
    v = tok.vocab_size
    prompt = [v + 32 * 1 + j for j in range(32)]
    given = prompt + [BOS] + tok.encode_for_model(text)
    ids = given + tok.encode_for_model(target) + [EOS]
    context = [True] * len(given) + [False] * (len(ids) - len(given))
    return ids, context


def original_scoring_input(tok, *pieces):
    v = tok.vocab_size
    ids = [v + 32 + j for j in range(32)] + [BOS]
    for piece in pieces:
        ids += tok.encode_for_model(piece)
    return ids


@pytest.mark.parametrize("name", ["ccpm", "lcsts", "kdconv", "math23k"])
def test_original_template_generation_inputs(tok, name):
    task = T.get_task(name)  # the default template is the original's
    assert task.kind == "generation" and task.prompt_task_id == 1
    ex = T.GenerationExample(input="今天天气不错，我们去北京", target="天气不错")
    ids, context = original_generation_input(tok, ex.input, ex.target)
    (row,) = task.to_rows([ex], tok)
    n = len(ids)
    assert row["input"][:n].tolist() == ids
    assert row["context"][:n].astype(bool).tolist() == context
    assert row["segment"][:n].tolist() == [0] * 32 + [2] * (n - 32)
    want_target = [ids[i + 1] if i + 1 < n and not context[i + 1] else IGNORE for i in range(n)]
    assert row["target"][:n].tolist() == want_target
    # Inference feeds the same given part: prompt slots of task 1, <s> and the raw input.
    assert task.prompt_task_id == 1 and [BOS] + tok.encode_for_model(ex.input) == task.given_ids(ex.input, tok, task.max_length)


def test_original_template_choice_and_ranking_inputs(tok, model):
    from cpmctl.model.inputs import build_inputs

    c3 = T.get_task("c3")
    ex = T.ChoiceExample("今天天气不错。问：天气怎么样？", ["不错", "很差"], 0)
    for option in ex.options:
        want = original_scoring_input(tok, ex.input, option, "[是否正确]")
        got = c3.option_ids(ex, option, tok, c3.max_length)
        batch = build_inputs(model, [got], task_id=c3.prompt_task_id)
        assert batch["input"][0].tolist() == want
        assert batch["segment"][0].tolist() == [0] * 32 + [2] * (len(want) - 32)
    sogou = T.get_task("sogou-log")
    pair = T.RankingExample("北京天气", "今天北京天气不错", 1.0)
    want = original_scoring_input(tok, pair.query, pair.document, "[是否正确]")
    got = sogou.pair_ids(pair, tok, sogou.max_length)
    assert build_inputs(model, [got], task_id=sogou.prompt_task_id)["input"][0].tolist() == want


def test_template_choice_is_checked():
    assert T.get_task("ccpm", template="cpmctl").kind == "choice"
    assert T.get_task("ccpm").kind == "generation"
    with pytest.raises(CpmctlError, match="task template must be one of original, cpmctl"):
        T.get_task("lcsts", template="mine")
