"""`cpmctl eval` end to end through the real CLI: model evaluation, scoring predictions files, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_config
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import save_native
from cpmctl.model.tokenizer import CPMAntTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
TASK_VOCAB = FIXTURES / "vocab.txt"
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "eval"


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, *argv)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = CPMAntTokenizer(TASK_VOCAB)
    out = tmp_path_factory.mktemp("eval") / "tiny"
    save_native(build_model(tiny_config(tok.vocab_size), seed=0), out, vocab=TASK_VOCAB)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generation_task_writes_predictions_and_scores(capsys, tmp_path, checkpoint):
    code, out, err = run(capsys, "eval", "--task", "lcsts", "--data", FIXTURES / "lcsts", "--model", checkpoint,
                         "--out", tmp_path / "ev", "--decode", "greedy", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["task"] == "lcsts" and result["n"] == 3
    assert set(result["metrics"]) >= {"rouge-1", "rouge-2", "rouge-l"}
    records = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["lcsts-s1", "lcsts-s2", "lcsts-s3"]
    assert all(isinstance(r["prediction"], str) for r in records)
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["metrics"] == result["metrics"] and scores["decode"]["decode"] == "greedy"
    # The predictions file, scored on its own, gives the same metrics.
    code, out, err = run(capsys, "eval", "--task", "lcsts", "--data", FIXTURES / "lcsts" / "test.jsonl",
                         "--predictions", tmp_path / "ev" / "predictions.jsonl", "--json")
    assert code == 0, err
    assert last_json(out)["metrics"] == result["metrics"]


@pytest.mark.parametrize("task", ["ccpm", "sogou-log"])
def test_scoring_tasks_through_the_cli(capsys, tmp_path, checkpoint, task):
    code, out, err = run(capsys, "eval", "--task", task, "--template", "cpmctl", "--data", FIXTURES / task, "--model", checkpoint,
                         "--out", tmp_path / task, "--batch-size", "3")
    assert code == 0, err
    scores = json.loads((tmp_path / task / "scores.json").read_text())
    key = "accuracy" if task == "ccpm" else "mrr"
    assert key in scores["metrics"] and key in out
    preds = [json.loads(line)["prediction"] for line in (tmp_path / task / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p, int) for p in preds) if task == "ccpm" else all(isinstance(p, float) for p in preds)


def test_predictions_matched_by_id_or_by_line(capsys, tmp_path):
    data = FIXTURES / "ccpm" / "test.jsonl"
    examples = [json.loads(line) for line in data.read_text().splitlines()]
    answers = [{"id": ex["id"], "prediction": ex["label"] if i % 2 else 0} for i, ex in enumerate(examples)]
    expected = 100.0 * sum(a["prediction"] == ex["label"] for a, ex in zip(answers, examples)) / len(examples)
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    for rows in (answers, shuffled, [{"prediction": a["prediction"]} for a in answers]):
        write_jsonl(tmp_path / "p.jsonl", rows)
        code, out, err = run(capsys, "eval", "--task", "ccpm", "--template", "cpmctl", "--data", data, "--predictions", tmp_path / "p.jsonl",
                             "--json")
        assert code == 0, err
        assert last_json(out)["metrics"]["accuracy"] == pytest.approx(expected)
    # An option's text is accepted for a choice task.
    write_jsonl(tmp_path / "p.jsonl", [{"prediction": ex["options"][ex["label"]]} for ex in examples])
    code, out, _ = run(capsys, "eval", "--task", "ccpm", "--template", "cpmctl", "--data", data, "--predictions", tmp_path / "p.jsonl", "--json")
    assert last_json(out)["metrics"]["accuracy"] == 100.0


def test_gold_predictions_score_perfectly_for_every_task(capsys, tmp_path):
    for task, field in (("lcsts", "target"), ("kdconv", "target"), ("math23k", "target"), ("c3", "label"),
                        ("sogou-log", "relevance")):
        data = FIXTURES / task / "test.jsonl"
        rows = [{"prediction": json.loads(line)[field]} for line in data.read_text().splitlines()]
        write_jsonl(tmp_path / f"{task}.jsonl", rows)
        code, out, err = run(capsys, "eval", "--task", task, "--data", data, "--predictions", tmp_path / f"{task}.jsonl",
                             "--json")
        assert code == 0, err
        metrics = last_json(out)["metrics"]
        top = {"lcsts": "rouge-l", "kdconv": "bleu-4", "math23k": "accuracy", "c3": "accuracy", "sogou-log": "ndcg@10"}
        assert metrics[top[task]] == pytest.approx(100.0), (task, metrics)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prediction": "a"}, {"prediction": "b"}], "2 predictions for 3 examples"),
        ([{"prediction": "a"}, {"text": "b"}, {"prediction": "c"}], "p.jsonl:2: missing field 'prediction'"),
        ([], "no predictions"),
        ([{"prediction": 1}, {"prediction": "b"}, {"prediction": "c"}], "p.jsonl:1: 'prediction' must be a string"),
        ([{"id": "lcsts-s1", "prediction": "a"}, {"id": "lcsts-s2", "prediction": "b"}, {"id": "x", "prediction": "c"}],
         "no prediction for id 'lcsts-s3'"),
        ([{"id": "lcsts-s1", "prediction": "a"}, {"id": "lcsts-s1", "prediction": "b"},
          {"id": "lcsts-s3", "prediction": "c"}], "p.jsonl:2: duplicate id 'lcsts-s1'"),
    ],
)
def test_bad_predictions_are_one_line_errors(capsys, tmp_path, rows, message):
    write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, err = run(capsys, "eval", "--task", "lcsts", "--data", FIXTURES / "lcsts", "--predictions",
                         tmp_path / "p.jsonl")
    assert code == 2, err
    assert "error:" in err and message in err, err
    assert "Traceback" not in err


def test_choice_prediction_out_of_range(capsys, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prediction": 4}] * 4)
    code, _, err = run(capsys, "eval", "--task", "ccpm", "--template", "cpmctl", "--data", FIXTURES / "ccpm", "--predictions", tmp_path / "p.jsonl")
    assert code == 2 and "p.jsonl:1: prediction 4 out of range for 4 options" in err


def test_bad_invocations(capsys, tmp_path, checkpoint):
    cases = [
        (["eval", "--task", "lcsts", "--data", FIXTURES / "lcsts"], "give --model PATH"),
        (["eval", "--task", "nope", "--data", FIXTURES / "lcsts", "--model", checkpoint], "unknown task 'nope'"),
        (["eval", "--task", "lcsts", "--data", tmp_path, "--model", checkpoint], "no test.jsonl"),
        (["eval", "--task", "lcsts", "--data", FIXTURES / "lcsts", "--model", checkpoint, "--split", "val"],
         "eval.split: expected one of 'train' | 'dev' | 'test', got 'val'"),
        (["eval", "--task", "lcsts", "--data", FIXTURES / "lcsts", "--model", checkpoint, "eval.batchsize=2"],
         "unknown recipe key 'eval.batchsize'"),
        (["eval", "--task", "lcsts", "--data", FIXTURES / "lcsts", "--model", checkpoint, "--decode", "nucleus",
          "--out", tmp_path / "x"], "decode.decode: expected 'beam' | 'sample' | 'greedy' | null, got 'nucleus'"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "x").exists()  # nothing written for a run that failed


def test_recipe_and_overrides(capsys):
    code, out, _ = run(capsys, "eval", "--recipe", RECIPES / "kdconv.yaml", "--print-recipe", "eval.batch_size=3",
                       "decode.max_new_tokens=7")
    assert code == 0
    assert "batch_size: 3" in out and "max_new_tokens: 7" in out and "repetition_penalty: 1.2" in out
    for recipe in RECIPES.glob("*.yaml"):
        assert run(capsys, "eval", "--recipe", recipe, "--print-recipe")[0] == 0


def test_custom_task_through_the_cli(capsys, tmp_path, checkpoint):
    code, out, err = run(capsys, "eval", "--task", "custom", "--task-def", FIXTURES / "custom" / "headline.yaml",
                         "--data", FIXTURES / "custom", "--model", checkpoint, "--out", tmp_path / "h", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["task"] == "headline" and "char_f1" in result["metrics"]


def test_adapter_is_applied(capsys, tmp_path, checkpoint):
    """--adapter scores with the LoRA layers: the same as the merged checkpoint, different from the base."""
    from cpmctl.model.lora import LoraSettings, inject_lora, merge_adapter, save_adapter
    from cpmctl.model.checkpoint import load_model

    model, _ = load_model(checkpoint)
    settings = LoraSettings(r=2, alpha=4.0)
    inject_lora(model, settings)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_adapter(model, tmp_path / "adapter", settings)
    merge_adapter(checkpoint, tmp_path / "adapter", tmp_path / "merged")

    def ranking_scores(*extra):
        code, _, err = run(capsys, "eval", "--task", "sogou-log", "--data", FIXTURES / "sogou-log", "--out",
                           tmp_path / "o", *extra)
        assert code == 0, err
        return [json.loads(x)["prediction"] for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]

    with_adapter = ranking_scores("--model", checkpoint, "--adapter", tmp_path / "adapter")
    merged = ranking_scores("--model", tmp_path / "merged")
    base = ranking_scores("--model", checkpoint)
    assert with_adapter == pytest.approx(merged, abs=1e-4)
    assert with_adapter != pytest.approx(base, abs=1e-3)
