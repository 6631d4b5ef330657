"""Stratified k-fold training on train+val merged: one sub-run per fold, CV accuracy, an ensemble to predict with."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from finetune.workflows.api import TrainResult, train
from finetune.data.prepare import Prepared
from finetune.data.sources import Sample
from finetune.engine import distributed
from finetune.workflows.opening import Opening, open_training
from finetune.config.recipe import Recipe
from finetune.outputs.report_page import build_report
from finetune.outputs.run_dir import RunDir
from finetune.tasks.single_label import stratified_folds

__all__ = ["KFoldResult", "fold_splits", "train_kfold"]

Log = Callable[[str], None]


@dataclass
class KFoldResult:
    """The parent run folder, each fold's result, and the cross-validated score (the task's headline metric)."""

    run_dir: Path
    folds: list[TrainResult]
    mean: float
    std: float
    oof_score: float  # the task's headline metric over every out-of-fold prediction
    predict_command: str

    @property
    def checkpoints(self) -> list[Path]:
        """Each fold's best.pt: pass them all to `predict` to average them."""
        return [f.best_checkpoint for f in self.folds]


def fold_splits(samples: list[Sample], classes: list[str], folds: int,
                seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """(train, val) per stratified fold of one-label-per-image samples (`Task.folds` for any task)."""
    return stratified_folds(samples, classes, folds, seed)


def _command(checkpoints: list[Path], test_dir: Optional[Path], out: Path) -> str:
    images = shlex.quote(str(test_dir)) if test_dir else "TEST_IMAGES_DIR"
    return " ".join(["finetune predict", *(shlex.quote(str(c)) for c in checkpoints), "--images", images,
                     "--out", shlex.quote(str(out))])


def _train_folds(opening: Opening, plan: list, parent: RunDir, log: Log) -> tuple[list[TrainResult], list[dict]]:
    """Train this process's folds (all of them in one process); every fold's result and summary row, in order."""
    recipe, task, dataset, folds = opening.recipe, opening.task, opening.dataset, len(plan)
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        log(f"{world} processes train the folds side by side (fold i on process (i-1) mod {world}); "
            "this log shows process 0's folds")
    done: list[tuple[int, TrainResult, dict]] = []
    for i, (train_samples, val_samples) in enumerate(plan, 1):
        if (i - 1) % world != rank:
            continue
        fold_recipe = recipe.derive(name=f"fold{i}", output=str(parent.path))
        fold_data = Prepared(dataset.classes, train_samples, val_samples, dataset.skipped, f"fold {i} of {folds}",
                             dataset.test_dir)
        with distributed.independent():  # this fold is this process's alone: no DDP, it writes its own folder
            result = train(fold_recipe, log=lambda line, i=i: log(f"[fold {i}/{folds}] {line}"), prepared=fold_data)
        done.append((i, result, {"fold": i, "run_dir": str(result.run_dir), "report": str(RunDir(result.run_dir).report),
                     "best_checkpoint": str(result.best_checkpoint),
                     "score": float(result.evaluation[task.headline]), "best_epoch": result.best_epoch,
                     "train_images": len(train_samples), "val_images": len(val_samples)}))
    gathered = sorted((item for part in distributed.gather_objects(done) for item in part), key=lambda item: item[0])
    return [result for _, result, _ in gathered], [row for _, _, row in gathered]


def train_kfold(
    recipe: Union[Recipe, str, Path, None],
    folds: int,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
    prepared: Optional[Prepared] = None,
) -> KFoldResult:
    """Train one model per stratified fold of all labelled images; writes cv_summary.json and report.html.

    `prepared` reuses data already discovered (a tuning study scans the folder once for all its trials).
    Under torchrun (`train --folds K --devices N`) the N processes train different folds side by side,
    each on its own device without DDP; rank 0 writes the summary once every fold is done.
    """
    opening = open_training(recipe, data, overrides, log, prepared)
    recipe, task, dataset = opening.recipe, opening.task, opening.dataset
    # The strongest HW03 solutions validated on folds of train+val together: every labelled image trains k-1 models.
    samples = [*dataset.train, *dataset.val]  # a shard set's samples are listed here (every shard's headers)
    plan = task.folds(samples, dataset.classes, folds, recipe.train.seed)
    parent = RunDir.create(recipe.output, recipe.name)
    parent.write_recipe(recipe)
    log(f"{folds}-fold {task.split_kind} cross-validation on {len(samples)} images (train+val merged); folds in "
        f"{parent.path}")

    results, rows = _train_folds(opening, plan, parent, log)
    scores = np.array([r["score"] for r in rows])
    # Every image is validated once, so the image-weighted mean of per-image metrics is the out-of-fold score.
    oof = float(sum(r["score"] * r["val_images"] for r in rows) / sum(r["val_images"] for r in rows))
    command = _command([r.best_checkpoint for r in results], dataset.test_dir, parent.submission)
    summary = {"folds": rows, "metric": task.headline, "mean": float(scores.mean()), "std": float(scores.std()),
               "std_ddof": 0, "oof_score": oof, "images": len(samples), "classes": dataset.classes,
               "skipped_images": len(dataset.skipped), "predict_command": command}
    parent.write_cv_summary(summary)
    parent.write_oof_predictions([RunDir(r.run_dir).eval.predictions for r in results])
    if parent.is_main:
        build_report(parent)
    log(f"CV {task.headline} {summary['mean']:.4f} ± {summary['std']:.4f} over {folds} folds "
        f"(out-of-fold {oof:.4f}); summary in {parent.cv_summary}")
    log(f"predict with the {folds}-model ensemble:\n  {command}")
    return KFoldResult(parent.path, results, summary["mean"], summary["std"], oof, command)
