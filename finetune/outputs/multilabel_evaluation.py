"""The evaluation bundle for several labels per image, and the per-class decision thresholds.

mAP and per-class average precision, micro/macro/sample F1, per-class precision/recall/F1/support,
a 2×2 confusion panel per class, precision-recall curves, the labels most often wrongly added or
missed, and the images with the worst label sets — in the same `EvalFiles` folder as single-label.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
from sklearn.metrics import classification_report, f1_score, multilabel_confusion_matrix

from finetune.data.sources import Sample
from finetune.engine.multilabel import mean_average_precision, sample_f1
from finetune.errors import FinetuneError
from finetune.outputs.figures.gallery import Tile, plot_gallery, thumbnail
from finetune.outputs.figures.multilabel_plots import plot_label_confusion_grid, plot_pr_curves
from finetune.config.options import InferenceOptions
from finetune.outputs.run_dir import EvalFiles

if TYPE_CHECKING:  # scoring a CSV needs no model
    from finetune.inference.predict import LoadedModel
    from finetune.config.recipe import DataConfig

__all__ = ["SEPARATOR", "write_multilabel_evaluation", "multilabel_summary_lines", "evaluate_multilabel_samples",
           "label_names", "manifest_samples"]

SEPARATOR = " "  # between labels in predictions.csv and submissions (Kaggle's Planet format)
GALLERY_LIMIT = 36


def label_names(row: np.ndarray, classes: Sequence[str], sep: str = SEPARATOR) -> str:
    """The class names of one 0/1 row, joined by `sep` (empty when none)."""
    return sep.join(classes[k] for k in np.flatnonzero(np.asarray(row) > 0.5))


def _label_errors(truth: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> list[list]:
    """Per class: false positives (added) and false negatives (missed), most errors first."""
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    order = np.argsort(-(fp + fn), kind="stable")
    return [[classes[k], int(fp[k]), int(fn[k]), int(truth[:, k].sum())] for k in order if fp[k] + fn[k] > 0]


def _write_gallery(truth: np.ndarray, predicted: np.ndarray, probs: np.ndarray, f1: np.ndarray,
                   classes: Sequence[str], paths: Sequence[Path], out: Path) -> None:
    """The images whose predicted label set is worst (lowest F1, then the most confident wrong label)."""
    wrong_confidence = np.where(predicted != truth, np.abs(probs - 0.5), 0).max(1) if len(probs) else probs
    order = np.lexsort((-wrong_confidence, f1))
    worst = [int(i) for i in order if f1[i] < 1.0][:GALLERY_LIMIT]
    if not worst:
        return
    tiles = []
    for i in worst:
        missed = label_names(truth[i] & ~predicted[i], classes, ", ") or "-"
        added = label_names(predicted[i] & ~truth[i], classes, ", ") or "-"
        # Wrapped: a tile is ~2 inches wide and a long label list would run into its neighbour's caption.
        caption = "\n".join([f"{Path(paths[i]).name}  F1 {f1[i]:.2f}", textwrap.fill(f"missed: {missed}", 34),
                             textwrap.fill(f"added: {added}", 34)])
        tiles.append(Tile(thumbnail(paths[i]), caption))
    mistaken = int((f1 < 1.0).sum())
    plot_gallery(tiles, out, f"worst label sets, lowest F1 first ({len(worst)} of {mistaken} imperfect images)")


def write_multilabel_evaluation(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                                classes: Sequence[str], files: EvalFiles,
                                paths: Optional[Sequence[Path]] = None, scores: bool = True) -> dict:
    """Write the multi-label bundle into `files` and return the metrics.

    `probs` are scores in [0, 1]; with `scores=False` they are the submitted 0/1 decisions themselves
    (a submission CSV), so no average precision or PR curve is computed.
    """
    files.prepare()
    truth = np.asarray(targets) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    predicted = probs >= np.asarray(thresholds)[None, :]
    labels = list(range(len(classes)))
    report = classification_report(truth.astype(int), predicted.astype(int), labels=labels,
                                   target_names=list(classes), output_dict=True, zero_division=0)
    per_image = sample_f1(truth, predicted)
    summary: dict = {
        "task": "multilabel", "images": int(len(truth)), "classes": len(classes),
        "samples_f1": float(per_image.mean()) if len(truth) else 0.0,
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "exact_match": float((truth == predicted).all(1).mean()) if len(truth) else 0.0,
    }
    if scores:
        summary["thresholds"] = {c: float(t) for c, t in zip(classes, thresholds)}
    ap = np.full(len(classes), np.nan)
    if scores and len(truth):
        summary["map"], ap = mean_average_precision(truth, probs)
        summary["average_precision"] = {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, ap)}
        for name, value in zip(classes, ap):
            report[name]["average_precision"] = None if np.isnan(value) else float(value)
    matrices = multilabel_confusion_matrix(truth, predicted, labels=labels)
    errors = _label_errors(truth, predicted, classes)
    if files.writes:
        f1 = [report[c]["f1-score"] for c in classes]
        plot_label_confusion_grid(matrices, classes, f1, files.label_confusion_png)
        if scores and truth.any():
            plot_pr_curves(truth, probs, classes, ap, files.pr_curves_png)
        files.write_csv(files.label_errors, [["label", "false_positives", "false_negatives", "images"], *errors])
        if scores:  # a scored CSV holds decisions already: no threshold was applied
            files.write_csv(files.thresholds, [["class", "threshold"], *([c, f"{t:.6g}"] for c, t in
                                                                          zip(classes, thresholds))])
        files.write_json(files.report_json, report)
        if paths is not None:
            files.write_csv(files.predictions, [["path", "true", "predicted", "f1", "correct"], *(
                [str(path), label_names(truth[i], classes), label_names(predicted[i], classes),
                 f"{per_image[i]:.4f}", int((truth[i] == predicted[i]).all())] for i, path in enumerate(paths))])
            _write_gallery(truth, predicted, probs, per_image, classes, paths, files.misclassified)
        files.write_json(files.metrics, summary)
    return {**summary, "report": report, "label_errors": errors, "out_dir": str(files.folder)}


def multilabel_summary_lines(metrics: dict, classes: Sequence[str]) -> list[str]:
    """The console view: per-class table, the averages, the labels most often added or missed."""
    report = metrics["report"]
    width = max(len(c) for c in list(classes) + ["samples avg"])
    lines = [f"{'class':<{width}}  precision  recall     f1      AP  support"]
    for name in list(classes) + ["micro avg", "macro avg", "samples avg"]:
        row = report[name]
        ap = row.get("average_precision")
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1-score']:5.3f}  "
                     f"{'   -  ' if ap is None else f'{ap:6.3f}'}  {int(row['support']):7d}")
    head = [f"samples F1 {metrics['samples_f1']:.4f}", f"micro F1 {metrics['micro_f1']:.4f}",
            f"macro F1 {metrics['macro_f1']:.4f}", f"exact match {metrics['exact_match']:.4f}"]
    if "map" in metrics:
        head.insert(0, f"mAP {metrics['map']:.4f}")
    lines.append(", ".join(head))
    if metrics["label_errors"]:
        lines.append("most errors (label: added / missed): " + ", ".join(
            f"{name}: {fp} / {fn}" for name, fp, fn, _ in metrics["label_errors"][:5]))
    return lines


def evaluate_multilabel_samples(loaded: "LoadedModel", samples: Sequence[Sample], files: EvalFiles,
                                inference: InferenceOptions, log: Callable[[str], None], thresholds: np.ndarray,
                                skipped: Optional[list] = None, raw_probs: Optional[np.ndarray] = None) -> dict:
    """Predict multi-label samples (or take `raw_probs`, already computed), cut them at `thresholds`, write the
    bundle into `files`, log the summary; the metrics.

    Each image is decoded once, here: one that fails is left out of the metrics and appended to `skipped`.
    `inference.precision` bf16 runs the model under bf16 autocast.
    """
    from finetune.data.images import SkippedImage
    from finetune.data.multilabel import multi_hot
    from finetune.inference.predict import ProbsSettings, predict_probs

    failed: dict[Path, str] = {}
    probs = raw_probs if raw_probs is not None else predict_probs(loaded, samples, ProbsSettings.of(inference),
                                                                  unreadable=failed)
    if failed:
        probs = probs[np.array([s.path not in failed for s in samples])]
        samples = [s for s in samples if s.path not in failed]
        if skipped is not None:
            skipped.extend(SkippedImage(path, reason) for path, reason in failed.items())
        if not samples:
            raise FinetuneError("none of the labelled images could be decoded; see the list of skipped images")
    metrics = write_multilabel_evaluation(multi_hot(samples, len(loaded.classes)), probs, thresholds,
                                          loaded.classes, files,
                                          [s.path for s in samples])
    for line in multilabel_summary_lines(metrics, loaded.classes):
        log(line)
    log(f"evaluation written to {files.folder}")
    return metrics


def manifest_samples(data: Path, cfg: "DataConfig", classes: Sequence[str]) -> tuple[list[Sample], list]:
    """The labelled samples of a multi-label manifest (CSV file, or folder holding the recipe's one) whose files
    open as images (headers only: the pixels are decoded once, when the images are scored)."""
    from finetune.data.multilabel import manifest_samples as read
    from finetune.data.prepare import openable

    samples, skipped = read(data, cfg, classes)
    kept, not_images = openable(samples)
    if not kept:
        raise FinetuneError(f"no labelled images that open in {data}")
    return kept, skipped + not_images
