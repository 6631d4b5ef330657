"""Stratified k-fold training on train+val merged: one sub-run per fold, CV accuracy, an ensemble to predict with."""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from finetune.api import TrainResult, create_run_dir, train
from finetune.data.images import check_images
from finetune.data.loaders import class_counts
from finetune.data.sources import DatasetSplits, Sample, discover
from finetune.errors import FinetuneError
from finetune.models.backbones import check_backbone_name
from finetune.recipe import Recipe, resolve_recipe
from finetune.reports.html import build_report

__all__ = ["KFoldResult", "fold_splits", "train_kfold"]

Log = Callable[[str], None]


@dataclass
class KFoldResult:
    """The parent run folder, each fold's result, and the cross-validated accuracy."""

    run_dir: Path
    folds: list[TrainResult]
    mean: float
    std: float
    oof_accuracy: float
    predict_command: str

    @property
    def checkpoints(self) -> list[Path]:
        """Each fold's best.pt: pass them all to `predict` to average them."""
        return [f.best_checkpoint for f in self.folds]


def fold_splits(
    samples: list[Sample], classes: list[str], folds: int, seed: int
) -> list[tuple[list[Sample], list[Sample]]]:
    """(train, val) sample lists for each of `folds` stratified folds; every image is validated exactly once."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise FinetuneError(f"--folds must be at least 2 (5 is usual), got {folds}")
    counts = class_counts(samples, len(classes))
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if n < folds]
    if small:
        raise FinetuneError(
            f"{folds}-fold cross-validation needs at least {folds} images per class; too few in: "
            f"{', '.join(small[:10])}. Use fewer folds or add images"
        )
    labels = [s.label for s in samples]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pairs = splitter.split(np.zeros(len(labels)), labels)
    return [([samples[i] for i in tr], [samples[i] for i in va]) for tr, va in pairs]


def _command(checkpoints: list[Path], test_dir: Optional[Path], out: Path) -> str:
    images = shlex.quote(str(test_dir)) if test_dir else "TEST_IMAGES_DIR"
    return " ".join(["finetune predict", *(shlex.quote(str(c)) for c in checkpoints), "--images", images,
                     "--out", shlex.quote(str(out))])


def _write_oof(out: Path, fold_predictions: list[Path]) -> None:
    """Every image's out-of-fold prediction in one CSV (for stacking or error analysis)."""
    with out.open("w", newline="") as handle:
        writer = None
        for fold, path in enumerate(fold_predictions, 1):
            with path.open(newline="") as source:
                for row in csv.DictReader(source):
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=["fold", *row])
                        writer.writeheader()
                    writer.writerow({"fold": fold, **row})


def train_kfold(
    recipe: Union[Recipe, str, Path, None],
    folds: int,
    data: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    log: Log = print,
) -> KFoldResult:
    """Train one model per stratified fold of all labelled images; writes cv_summary.json and report.html."""
    recipe = resolve_recipe(recipe, overrides, data)
    check_backbone_name(recipe.model.backbone)
    splits = discover(recipe.data, recipe.train.seed)
    # The strongest HW03 solutions validated on folds of train+val together: every labelled image trains k-1 models.
    skipped = splits.skipped + check_images([s.path for s in splits.train + splits.val])
    bad = {s.path for s in skipped}
    samples = [s for s in splits.train + splits.val if s.path not in bad]
    plan = fold_splits(samples, splits.classes, folds, recipe.train.seed)
    parent = create_run_dir(recipe.output, recipe.name)
    recipe.to_yaml(parent / "recipe.yaml")
    log(f"{folds}-fold cross-validation on {len(samples)} images (train+val merged); folds in {parent}")

    results: list[TrainResult] = []
    rows = []
    for i, (train_samples, val_samples) in enumerate(plan, 1):
        fold_recipe = Recipe.from_dict(recipe.to_dict())
        fold_recipe.output, fold_recipe.name = str(parent), f"fold{i}"
        fold_data = DatasetSplits(splits.classes, train_samples, val_samples, f"fold {i} of {folds}",
                                  splits.test_dir, skipped)
        result = train(fold_recipe, log=lambda line, i=i: log(f"[fold {i}/{folds}] {line}"), splits=fold_data)
        results.append(result)
        rows.append({"fold": i, "run_dir": str(result.run_dir), "best_checkpoint": str(result.best_checkpoint),
                     "accuracy": float(result.evaluation["accuracy"]), "best_epoch": result.best_epoch,
                     "train_images": len(train_samples), "val_images": len(val_samples)})

    scores = np.array([r["accuracy"] for r in rows])
    oof = float(sum(r["accuracy"] * r["val_images"] for r in rows) / sum(r["val_images"] for r in rows))
    command = _command([r.best_checkpoint for r in results], splits.test_dir, parent / "submission.csv")
    summary = {"folds": rows, "mean": float(scores.mean()), "std": float(scores.std()), "std_ddof": 0,
               "oof_accuracy": oof, "images": len(samples), "classes": splits.classes,
               "skipped_images": len(skipped), "predict_command": command}
    (parent / "cv_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_oof(parent / "oof_predictions.csv", [r.run_dir / "eval" / "predictions.csv" for r in results])
    build_report(parent)
    log(f"CV accuracy {summary['mean']:.4f} ± {summary['std']:.4f} over {folds} folds "
        f"(out-of-fold {oof:.4f}); summary in {parent / 'cv_summary.json'}")
    log(f"predict with the {folds}-model ensemble:\n  {command}")
    return KFoldResult(parent, results, summary["mean"], summary["std"], oof, command)
