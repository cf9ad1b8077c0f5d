"""The recipe loader (cpmctl/recipe.py): choices, key paths, section defaults, the order of flags and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpmctl import CpmctlError
from cpmctl.prune.recipe import load_prune_recipe
from cpmctl.recipe import check_recipe, default_of, load_recipe
from cpmctl.train.recipe import PretrainRecipe, TrainConfig
from cpmctl.tune.recipe import TuneRecipe, load_tune_recipe


def test_a_bad_choice_fails_at_load_with_its_key_path():
    with pytest.raises(CpmctlError, match=r"train\.precision: expected one of 'fp32' \| 'bf16' \| 'fp16', got 'fp8'"):
        load_recipe(PretrainRecipe, None, ["train.precision=fp8"])
    with pytest.raises(CpmctlError, match=r"task\.template: expected one of 'original' \| 'cpmctl', got 'mine'"):
        load_tune_recipe(None, ["task.template=mine"])


def test_a_shared_section_names_where_it_sits():
    """The same TrainConfig is `mask` and `recovery` in a prune recipe: its range errors say so."""
    with pytest.raises(CpmctlError, match=r"^mask\.batch_size: must be positive, got 0"):
        load_prune_recipe(None, ["mask.batch_size=0"])
    with pytest.raises(CpmctlError, match=r"^recovery\.steps: must be positive, got -1"):
        load_prune_recipe(None, ["recovery.steps=-1"])
    with pytest.raises(CpmctlError, match=r"^train\.batch_size: must be positive"):
        load_recipe(PretrainRecipe, None, ["train.batch_size=0", "data.train=x", "model.init=mini-10b"])


def test_an_instance_built_in_python_is_checked_too():
    with pytest.raises(CpmctlError, match=r"^train\.schedule: expected one of"):
        check_recipe(TrainConfig(schedule="exponential"), "train")
    check_recipe(TrainConfig(), "train")  # the defaults pass


def test_a_partial_section_keeps_the_stages_own_defaults():
    """Tuning's `train:` defaults (warmup 50, save_every 200) survive a recipe that sets only the lr."""
    recipe = load_recipe(TuneRecipe, None, ["train.lr=0.01"])
    assert (recipe.train.lr, recipe.train.warmup_steps, recipe.train.save_every) == (0.01, 50, 200)
    assert TrainConfig().warmup_steps != 50  # the plain TrainConfig default differs: the stage's won
    assert default_of(TuneRecipe, "train.warmup_steps") == 50


def test_flags_come_after_the_file_and_before_overrides(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text("task:\n  name: lcsts\n  template: cpmctl\ntrain:\n  lr: 0.5\n", encoding="utf-8")
    recipe = load_recipe(TuneRecipe, path, [], flags={"task.template": "original", "train.lr": None})
    assert recipe.task.template == "original"  # a given flag beats the file
    assert recipe.train.lr == 0.5  # a flag that was not given (None) changes nothing
    recipe = load_recipe(TuneRecipe, path, ["task.template=cpmctl"], flags={"task.template": "original"})
    assert recipe.task.template == "cpmctl"  # an explicit key=value override beats the flag


def _recipe_class(path):
    from cpmctl.data.recipe import FilterRecipe
    from cpmctl.evaluate.recipe import EvalRecipe
    from cpmctl.lifecycle.recipe import LifecycleRecipe
    from cpmctl.prune.recipe import PruneRecipe

    return {"pretrain": PretrainRecipe, "prune": PruneRecipe, "tune": TuneRecipe, "eval": EvalRecipe,
            "data": FilterRecipe, "lifecycle": LifecycleRecipe}[path.parent.name]


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name + "/" + p.name for p in SHIPPED])
def test_every_shipped_recipe_loads_and_validates(path):
    """Each YAML under recipes/ parses into its stage's recipe type with every key known and every value valid."""
    recipe = load_recipe(_recipe_class(path), path, [])
    check_recipe(recipe)
    assert path.read_text(encoding="utf-8").startswith("#"), "a recipe starts with the command that runs it"


# ----- built-in recipes by name, and the documentation read from the dataclasses ------------------------------
def test_a_built_in_recipe_is_found_by_name_wherever_a_recipe_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the name resolves through cpmctl/resources.py
    by_name = load_recipe(PretrainRecipe, "pretrain/mini", [])
    assert by_name == load_recipe(PretrainRecipe, "recipes/pretrain/mini.yaml", []) == load_recipe(
        PretrainRecipe, SHIPPED[[p.parent.name + "/" + p.stem for p in SHIPPED].index("pretrain/mini")], [])
    assert by_name.train.steps != TrainConfig().steps  # the file was read, not just the defaults
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "mini").write_text("data: {train: x}\ntrain: {steps: 7}\n", encoding="utf-8")
    assert load_recipe(PretrainRecipe, "pretrain/mini", []).train.steps == 7  # a file that exists comes first
    with pytest.raises(CpmctlError, match=r"recipe not found: nope \(not a file, nor a built-in recipe: .*pretrain/mini"):
        load_recipe(PretrainRecipe, "nope", [])


def test_field_docs_are_the_dataclass_comments():
    from cpmctl.recipe import field_docs
    from cpmctl.model.generation_config import DecodeOverrides

    docs = field_docs(TrainConfig)
    assert docs["batch_size"] == "rows per micro-batch per process"  # the comment at the end of the line
    assert docs["original_lr_scaling"].startswith("AdamW on folded weights")  # the comment lines above it
    assert "dynamic loss scale" in docs["precision"]  # the comment of its type alias, Precision
    assert "train/schedule.py" in docs["schedule"]
    # DecodeOverrides is made in code: it borrows GenerationConfig's comments.
    assert field_docs(DecodeOverrides)["repetition_window"].startswith("The repetition penalty looks at")


def test_describe_recipe_loads_back_as_the_same_recipe():
    import yaml

    from cpmctl.recipe import describe_recipe, from_dict

    recipe = load_recipe(TuneRecipe, "tune/mini", ["lora.r=4"])
    lines = describe_recipe(recipe)
    assert from_dict(TuneRecipe, yaml.safe_load("\n".join(lines))) == recipe
    line = next(x for x in lines if x.strip().startswith("warmup_steps:"))
    # tuning's own default for the shared train section, not TrainConfig's
    assert f"default {TuneRecipe().train.warmup_steps};" in line and line.strip().startswith("warmup_steps: ")
    assert any(x.strip().startswith("r: 4  # int; default 8") for x in lines)


def _keys(cls, at=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{at}{f.name}.")
        else:
            yield cls, f"{at}{f.name}"


@pytest.mark.parametrize("kind", ["pretrain", "prune", "tune", "eval", "data", "lifecycle"])
def test_every_key_of_the_stage_recipes_has_a_meaning(kind):
    """Each key of the recipe dataclasses in */recipe.py has a comment that `cpmctl recipes show` prints
    (sections borrowed from other modules, lora: and decode:, are documented where they live)."""
    from cpmctl.recipe import field_docs

    cls = _recipe_class(Path(kind) / "x.yaml")
    missing = [key for owner, key in _keys(cls) if owner.__module__.endswith(".recipe")
               and not field_docs(owner).get(key.rsplit(".", 1)[-1])]
    assert not missing, f"add a comment to these fields: {missing}"
