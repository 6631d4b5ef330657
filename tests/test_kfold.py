"""k-fold: stratified folds over train+val, one sub-run per fold, CV summary, and the ensemble predict command."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from conftest import QUICK_CPU, TINY_OVERRIDES, write_folder_dataset
from finetune import FinetuneError
from finetune.cli import main
from finetune.data.sources import Sample
from finetune.workflows.kfold import fold_splits, train_kfold

quiet = lambda line: None  # noqa: E731


def test_folds_are_stratified_and_validate_every_image_once():
    samples = [Sample(Path(f"{c}_{i}.jpg"), c) for c in range(3) for i in range(7)]
    folds = fold_splits(samples, ["a", "b", "c"], 3, seed=0)
    assert len(folds) == 3
    validated = [s for _, val in folds for s in val]
    assert sorted(validated, key=str) == sorted(samples, key=str)
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == 21
        assert {s.target for s in val} == {0, 1, 2}  # stratified: every class in every fold
    with pytest.raises(FinetuneError, match=r"at least 8 images per class; too few in: a \(7\), b \(7\)"):
        fold_splits(samples, ["a", "b", "c"], 8, seed=0)
    with pytest.raises(FinetuneError, match="at least 2"):
        fold_splits(samples, ["a", "b", "c"], 1, seed=0)


def test_kfold_trains_each_fold_and_its_ensemble_predicts(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "shapes", per_class=6, val_per_class=2, test=4)
    lines: list[str] = []
    result = train_kfold(None, 2, data=root, log=lines.append,
                         overrides=TINY_OVERRIDES + [f"output={tmp_path / 'runs'}", "name=cv", "train.epochs=1"])
    parent = tmp_path / "runs" / "cv"
    assert result.run_dir == parent
    summary = json.loads((parent / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2]
    assert summary["images"] == 24  # train (18) and val (6) merged
    with (parent / "oof_predictions.csv").open() as handle:
        oof = list(csv.DictReader(handle))
    assert len(oof) == 24 and {r["fold"] for r in oof} == {"1", "2"}
    assert sum(int(r["correct"]) for r in oof) / 24 == pytest.approx(summary["oof_score"])
    assert sum(f["val_images"] for f in summary["folds"]) == 24
    accuracies = [f["score"] for f in summary["folds"]]
    assert summary["mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2)
    for fold in ("fold1", "fold2"):
        assert (parent / fold / "best.pt").is_file() and (parent / fold / "report.html").is_file()
    page = (parent / "report.html").read_text()
    assert "2-fold CV accuracy" in page and 'href="fold1/report.html"' in page
    assert any(line.startswith("[fold 2/2] ") for line in lines)
    assert any("CV accuracy" in line and "±" in line for line in lines)

    command = summary["predict_command"]
    assert command in "\n".join(lines)
    argv = shlex.split(command)
    assert argv[:2] == ["finetune", "predict"] and argv[2:4] == [str(c) for c in result.checkpoints]
    assert main(argv[1:] + ["--workers", "0"]) == 0
    with (parent / "submission.csv").open() as handle:
        assert [r["Id"] for r in csv.DictReader(handle)] == ["0001", "0002", "0003", "0004"]


def test_cli_rejects_a_single_fold(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "shapes", per_class=3, val_per_class=1, test=1)
    args = ["train", QUICK_CPU, "--data", str(root), "--folds", "1"]
    for item in TINY_OVERRIDES + [f"output={tmp_path / 'runs'}"]:
        args += ["--set", item]
    assert main(args) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # rejected before any folder is made
