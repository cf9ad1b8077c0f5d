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
