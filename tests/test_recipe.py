"""Recipe parsing: types, unknown keys, overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.config.recipe import Recipe, load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_are_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: x\ntrain: {epochs: 3, lr: 1}\n"), ["data.batch_size=4", "model.trainable=[layer4]"])
    assert recipe.train.epochs == 3
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.data.batch_size == 4
    assert recipe.model.trainable == ["layer4"]


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(FinetuneError, match=r"unknown recipe key 'train.epocs'.*train.epochs"):
        load_recipe(write(tmp_path, "train: {epocs: 3}\n"))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(FinetuneError, match=r"'data.batch_size' must be int, got 'big'"):
        load_recipe(write(tmp_path, "data: {batch_size: big}\n"))


def test_bad_choice_lists_the_valid_ones():
    with pytest.raises(FinetuneError, match="valid choices: adamw, sgd"):
        load_recipe(None, ["train.optimizer=adam"])


def test_missing_recipe_file_and_invalid_yaml(tmp_path):
    with pytest.raises(FinetuneError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        load_recipe(write(tmp_path, "train: [unclosed\n"))


def test_round_trip_through_yaml(tmp_path):
    recipe = load_recipe(None, ["model.head.hidden=[1024, 512]", "name=abc"])
    recipe.to_yaml(tmp_path / "out.yaml")
    again = load_recipe(tmp_path / "out.yaml")
    assert again == recipe
    assert isinstance(again, Recipe)
