"""Unlabeled images: the HW03 2021 semi-supervised layout, temperature calibration, reject-below, pseudo-labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, make_image
from finetune.data.prepare import prepare
from finetune.errors import FinetuneError
from finetune.recipe import DataConfig, Recipe


def write_hw03_2021(root: Path, per_class: int = 8, val_per_class: int = 3, unlabeled: int = 12,
                    test: int = 6) -> Path:
    """food-11 2021: training/labeled/<NN>/, training/unlabeled/00/, validation/<NN>/, testing/00/.

    Unlabeled images are named <true label>_<n>.jpg (HW03's own naming), so pseudo-label accuracy can be read.
    """
    colours, seed = list(COLOURS.values()), 5000
    for split, count in (("training/labeled", per_class), ("validation", val_per_class)):
        for label, colour in enumerate(colours):
            folder = root / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                make_image(colour, seed).save(folder / f"{label}_{i}.jpg")
    for split, count in (("training/unlabeled/00", unlabeled), ("testing/00", test)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            make_image(colours[i % 3], seed).save(folder / (f"{i % 3}_{i}.jpg" if "unlabeled" in split
                                                            else f"{i:04d}.jpg"))
    return root


@pytest.fixture
def food_2021(tmp_path: Path) -> Path:
    return write_hw03_2021(tmp_path / "food-11")


def test_auto_layout_reads_labeled_unlabeled_and_testing(food_2021: Path) -> None:
    lines: list[str] = []
    prepared = prepare(Recipe(data=DataConfig(root=str(food_2021))), lines.append)
    assert prepared.classes == ["00", "01", "02"]
    assert len(prepared.train) == 24 and len(prepared.val) == 9
    assert prepared.unlabeled_dir == food_2021 / "training" / "unlabeled"
    assert prepared.test_dir == food_2021 / "testing" / "00"
    assert any("training/labeled/<class>/" in line for line in lines)
    assert any("unlabeled images: 12" in line for line in lines)


def test_labeled_unlabeled_folders_are_never_classes_unless_asked(food_2021: Path) -> None:
    with pytest.raises(FinetuneError, match="labeled/unlabeled split, not classes"):
        prepare(Recipe(data=DataConfig(root=str(food_2021), train="training", val=None)), print)
    # Saying so (layout: folder) takes them as two classes.
    prepared = prepare(Recipe(data=DataConfig(root=str(food_2021), train="training", val=None, layout="folder",
                                              unlabeled=None)), print)
    assert prepared.classes == ["labeled", "unlabeled"] and prepared.unlabeled_dir is None


def test_recipe_names_the_folders(food_2021: Path, tmp_path: Path) -> None:
    other = food_2021 / "extra_pool"
    other.mkdir()
    make_image((1, 2, 3), 1).save(other / "a.jpg")
    prepared = prepare(Recipe(data=DataConfig(root=str(food_2021), train="training/labeled",
                                              unlabeled="extra_pool", test="testing/00")), print)
    assert prepared.unlabeled_dir == other and prepared.classes == ["00", "01", "02"]
    with pytest.raises(FinetuneError, match="data.unlabeled"):
        prepare(Recipe(data=DataConfig(root=str(food_2021), unlabeled="nowhere")), print)


def test_a_class_called_unlabeled_stays_a_class(tmp_path: Path) -> None:
    for name in ("cat", "unlabeled"):
        folder = tmp_path / "d" / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            make_image((200, 10, 10) if name == "cat" else (10, 10, 200), i).save(folder / f"{i}.jpg")
    prepared = prepare(Recipe(data=DataConfig(root=str(tmp_path / "d"))), print)
    assert prepared.classes == ["cat", "unlabeled"] and prepared.unlabeled_dir is None
