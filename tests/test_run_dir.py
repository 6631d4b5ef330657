"""RunDir: never overwrites a run, opens one to resume, and writes nothing on a process that is not the main one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from finetune import FinetuneError, Recipe
from finetune.data.images import SkippedImage
from finetune.outputs.evaluation import write_evaluation
from finetune.outputs.report_page import build_report
from finetune.outputs.run_dir import EvalFiles, RunDir


def _fill(run: RunDir) -> None:
    """One of every write a training run makes."""
    run.write_recipe(Recipe())
    run.write_data_summary(["a", "b"], [3, 4], [1, 2])
    run.write_skipped([SkippedImage(run.path / "x.jpg", "truncated")], log=lambda line: None)
    row = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.5, "val_loss": 0.5, "val_acc": 0.5, "lr": "1e-3",
           "seconds": 1.0}
    run.append_history(row)
    run.plot_curves([row])
    run.save_checkpoint(run.last, {"classes": ["a", "b"]})
    write_evaluation([0, 1, 1], [0, 1, 0], ["a", "b"], run.eval, np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))


def test_create_never_overwrites(tmp_path: Path) -> None:
    first, second = RunDir.create(tmp_path, "exp"), RunDir.create(tmp_path, "exp")
    assert (first.path.name, second.path.name) == ("exp", "exp-2")
    second.save_checkpoint(second.best, {})
    assert RunDir.open(second.best).path == second.path  # a checkpoint path opens its folder


def test_the_main_process_writes_every_file(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp")
    _fill(run)
    for path in (run.recipe, run.classes, run.class_counts, run.skipped, run.history, run.curves, run.last,
                 run.eval.metrics, run.eval.confusion_png, run.eval.confusion_csv):
        assert path.is_file(), path
    assert list(csv.reader(run.class_counts.open())) == [["class", "train", "val"], ["a", "3", "1"], ["b", "4", "2"]]
    assert build_report(run).is_file()


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir.create(tmp_path, "exp")
    monkeypatch.setenv("RANK", "3")  # as torchrun sets it on the fourth process
    _fill(run)
    build_report(run)
    assert list(run.path.iterdir()) == []


def test_resume_finds_last_checkpoint_or_says_why_not(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp")
    with pytest.raises(FinetuneError, match="did not finish its first epoch"):
        RunDir.resume_checkpoint(run.path)
    run.save_checkpoint(run.last, {})
    assert RunDir.resume_checkpoint(run.path) == run.last == RunDir.resume_checkpoint(run.last)
    with pytest.raises(FinetuneError, match="no such run folder"):
        RunDir.resume_checkpoint(tmp_path / "missing")


def test_an_evaluation_outside_the_run_gets_its_own_page(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp")
    run.write_recipe(Recipe())
    elsewhere = EvalFiles(tmp_path / "holdout")
    write_evaluation([0, 1], [0, 1], ["a", "b"], elsewhere)
    assert build_report(run, elsewhere) == elsewhere.report and elsewhere.report.is_file()
    assert not run.report.exists()
