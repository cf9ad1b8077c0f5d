"""`cpmctl recipes list|show|copy`, built-in recipe names on the commands, choices rejected before any work, the
bundled paths of a lifecycle recipe, the JSON `output` key, and the input fields carried into predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))


def test_list_names_every_shipped_recipe(capsys):
    code, out, err = run_cli(capsys, "recipes", "list", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["name"] for r in rows] == SHIPPED
    assert all(r["summary"] and Path(r["path"]).is_file() for r in rows)
    code, out, _ = run_cli(capsys, "recipes", "list")
    assert code == 0 and "pretrain/mini" in out


@pytest.mark.parametrize("name", ["pretrain/mini", "prune/10b-7b", "tune/lcsts", "eval/lcsts", "data/filter",
                                  "lifecycle/mini"])
def test_show_prints_every_key_and_loads_back(capsys, name):
    from cpmctl.cli.recipes import schema
    from cpmctl.recipe import from_dict, load_recipe_file

    code, out, err = run_cli(capsys, "recipes", "show", name)
    assert code == 0, err
    cls = schema(name.split("/")[0])
    assert from_dict(cls, yaml.safe_load(out)) == from_dict(cls, load_recipe_file(name))
    keys = [line for line in out.splitlines() if line.strip() and not line.startswith("#")
            and not line.split("  # ")[0].rstrip().endswith(":")]  # every key line but a section's
    assert keys and all("  # " in line and "; default " in line for line in keys)


def test_show_a_kinds_defaults_with_overrides_and_a_bad_choice(capsys):
    code, out, _ = run_cli(capsys, "recipes", "show", "pretrain", "train.lr=3e-3")
    assert code == 0
    assert "  lr: 0.003  # float; default 0.001; the peak learning rate" in out
    code, out, err = run_cli(capsys, "recipes", "show", "pretrain", "train.logger=mlflow")
    assert code == 2 and "train.logger: expected one of 'jsonl' | 'tensorboard' | 'wandb', got 'mlflow'" in err
    code, _, err = run_cli(capsys, "recipes", "show", "nope/nothing")
    assert code == 2 and "no built-in recipe 'nope/nothing' (built-in: data/filter" in err


def test_copy_writes_a_copy_and_never_overwrites(capsys, tmp_path):
    dest = tmp_path / "mine.yaml"
    code, out, err = run_cli(capsys, "recipes", "copy", "tune/mini", dest, "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == str(dest)
    assert dest.read_text(encoding="utf-8") == (REPO / "recipes" / "tune" / "mini.yaml").read_text(encoding="utf-8")
    dest.write_text("# my edits\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "recipes", "copy", "tune/mini", dest)
    assert code == 2 and "--force" in err
    assert dest.read_text(encoding="utf-8") == "# my edits\n"  # the user's file is untouched
    code, _, _ = run_cli(capsys, "recipes", "copy", "tune/mini", dest, "--force")
    assert code == 0 and dest.read_text(encoding="utf-8").startswith("# LoRA")
    code, _, _ = run_cli(capsys, "recipes", "copy", "pretrain/mini", tmp_path)  # into a directory
    assert code == 0 and (tmp_path / "mini.yaml").is_file()


@pytest.mark.parametrize("override, allowed", [("train.precision=fp8", "'fp32' | 'bf16' | 'fp16'"),
                                               ("train.engine=deepspeed", "'single' | 'ddp' | 'fsdp'")])
def test_a_bad_choice_fails_at_print_recipe_with_the_allowed_list(capsys, override, allowed):
    code, out, err = run_cli(capsys, "pretrain", "--recipe", "pretrain/mini", override, "--print-recipe")
    assert code == 2 and out == ""
    assert f"expected one of {allowed}, got '{override.split('=')[1]}' (set by the override '{override}')" in err


def test_built_in_names_work_on_the_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["pretrain", "--recipe", "pretrain/mini"], ["prune", "--recipe", "prune/mini"],
                 ["tune", "lora", "--recipe", "tune/lcsts"], ["eval", "--recipe", "eval/lcsts"],
                 ["data", "filter", "--recipe", "data/filter"], ["run", "lifecycle/mini"]):
        code, out, err = run_cli(capsys, *argv, "--print-recipe", "--json")
        assert code == 0, (argv, err)
        assert json.loads(out)


def test_lifecycle_paths_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    from cpmctl.resources import assets_dir, bundled, recipes_dir

    monkeypatch.chdir(tmp_path)
    assert Path(bundled("recipes/data/filter.yaml")) == recipes_dir() / "data" / "filter.yaml"
    assert Path(bundled("cpmctl/assets/corpus/batch1.jsonl")) == assets_dir() / "corpus" / "batch1.jsonl"
    assert bundled("mine/data.jsonl") == "mine/data.jsonl" and bundled("pretrain/mini") == "pretrain/mini"
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "filter.yaml").write_text("{}\n")
    assert bundled("recipes/data/filter.yaml") == "recipes/data/filter.yaml"  # the user's own file wins


def test_model_results_name_their_output(capsys, tmp_path, tiny_vocab):
    code, out, err = run_cli(capsys, "model", "init", "--config", "mini-10b", "--vocab", tiny_vocab, "--out",
                             tmp_path / "m", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == str(tmp_path / "m")


def test_eval_predictions_carry_the_input_lines_other_fields(tmp_path):
    from cpmctl.evaluate.runner import input_fields, load_examples, write_predictions
    from cpmctl.tasks import get_task

    task = get_task("lcsts")
    data = tmp_path / "test.jsonl"
    rows = [{"id": "a", "input": "今天天气很好", "target": "天气", "source": "weibo"},
            {"input": "北京的冬天", "target": "冬天", "source": "news", "n": 2}]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    examples = load_examples(task, data, "test")
    fields = input_fields(task, data, "test", examples)
    assert fields == [{"source": "weibo"}, {"source": "news", "n": 2}]
    out = write_predictions(tmp_path / "p.jsonl", task, examples, ["天气", "冬"], fields)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"source": "weibo", "id": "a", "prediction": "天气", "reference": "天气"}
    assert lines[1]["n"] == 2 and lines[1]["prediction"] == "冬"
