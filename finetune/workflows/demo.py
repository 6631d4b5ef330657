"""The built-in demo: Fashion-MNIST → fine-tuned EfficientNet-Lite0 → submission.csv → score, offline.

It runs the same public path a user runs (`api.train`, then `api.predict`) with the shipped recipe
`demo_fashion_mnist_lite0`, and scores the submission against the held-back answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from finetune.workflows.api import TrainResult, predict, train
from finetune.workflows.datasets import FashionMNISTExport, FashionMNISTSplit, describe, export_fashion_mnist
from finetune.outputs.evaluation import format_report
from finetune.config.options import InferenceOptions
from finetune.config.recipe import load_recipe
from finetune.config.recipe_library import find_recipe, shipped_recipe
from finetune.outputs.run_dir import RunDir
from finetune.outputs.scoring import score_csv

__all__ = ["DEMO_RECIPE", "DemoResult", "run_demo"]

DEMO_RECIPE = shipped_recipe("demo_fashion_mnist_lite0").path

Log = Callable[[str], None]


@dataclass
class DemoResult:
    """Where the demo put everything, and how well and how fast it did."""

    export: FashionMNISTExport
    train: TrainResult
    submission: Path
    score_file: Path
    eval_dir: Path
    accuracy: float
    seconds: float


def run_demo(
    out: Union[str, Path] = "demo",
    split: Optional[FashionMNISTSplit] = None,
    epochs: Optional[int] = None,
    recipe: Optional[Union[str, Path]] = None,
    overrides: Optional[list[str]] = None,
    tta: Optional[str] = "flip",
    log: Log = print,
) -> DemoResult:
    """Export Fashion-MNIST, fine-tune Lite0 from ImageNet weights, predict the test folder and score it.

    Args:
        out: folder for the data set and runs.
        split: images per class for training and validation, and how many test images (FashionMNISTSplit).
        epochs: override the recipe's train.epochs.
        recipe: another recipe: a YAML path or a shipped recipe's name (None: demo_fashion_mnist_lite0).
        overrides: override a recipe value, e.g. data.image_size=64 (repeatable).
        tta: test-time augmentation for the submission: flip or none.
        log: where progress lines go.
    """
    start = time.perf_counter()
    split = split or FashionMNISTSplit()
    out = Path(out).expanduser().resolve()
    recipe_path = find_recipe(recipe) if recipe else DEMO_RECIPE
    settings = [f"output={out / 'runs'}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
    demo_recipe = load_recipe(recipe_path, settings + list(overrides or []))

    folder = out / f"fashion_mnist_{split.per_class}x{split.val_per_class}_test{split.test_limit or 'all'}"
    export = export_fashion_mnist(folder, split, reuse=True)
    log(describe(export))

    trained = train(demo_recipe, data=export.root, log=log)
    run = RunDir(trained.run_dir)
    submission = predict(trained.best_checkpoint, export.test_dir, run.test_submission,
                         inference=InferenceOptions(batch_size=4 * demo_recipe.data.batch_size,
                                                    num_workers=demo_recipe.data.num_workers, tta=tta), log=log)
    eval_dir = run.test_eval.folder
    metrics = score_csv(submission, export.truth_csv, out_dir=eval_dir, classes=trained.classes)
    log(format_report(metrics["report"], trained.classes))
    seconds = time.perf_counter() - start
    log("\n".join([
        (f"demo finished in {seconds / 60:.1f} min: test accuracy {metrics['accuracy']:.4f} on "
         f"{export.counts['test']} images (validation accuracy {trained.evaluation['accuracy']:.4f})"),
        f"  data set          {export.root}",
        f"  run folder        {run.path}  ({', '.join(p.name for p in (run.recipe, run.history, run.curves, run.best))}, "
        f"{run.eval.folder.name}/)",
        f"  submission        {submission}",
        f"  score             {metrics['score_file']}",
        f"  confusion matrix  {run.test_eval.confusion_png}",
    ]))
    return DemoResult(export, trained, submission, Path(metrics["score_file"]), eval_dir, metrics["accuracy"], seconds)
