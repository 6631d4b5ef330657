"""Evaluation bundle: confusion matrix (PNG + CSV), per-class report, most-confused pairs, top-k accuracy,
calibration (ECE + reliability diagram), the misclassified gallery and Grad-CAM of the worst mistakes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, top_k_accuracy_score

from finetune.data.images import SkippedImage
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.outputs.figures.calibration import accuracy_coverage, calibration_bins, plot_coverage, plot_reliability
from finetune.outputs.figures.gallery import Tile, plot_gallery, thumbnail, worst_mistakes
from finetune.outputs.figures.plots import BARS, plot_class_recall, plot_confused_pairs, plot_confusion_matrix
from finetune.config.options import InferenceOptions
from finetune.outputs.run_dir import EvalFiles

if TYPE_CHECKING:  # scoring a CSV needs no model: inference (and timm) load only when a model is evaluated
    from finetune.inference.predict import LoadedModel

__all__ = ["most_confused", "top_k_accuracies", "write_evaluation", "format_report", "summary_lines",
           "evaluate_samples"]

GALLERY_LIMIT = 36  # a 6 x 6 grid: enough to see a pattern, small enough to look at every one
CAM_LIMIT = 12


def most_confused(matrix: np.ndarray, classes: Sequence[str], limit: int = 10) -> list[tuple[str, str, int]]:
    """(true, predicted, count) for the largest off-diagonal cells, largest first (ties: row-major order)."""
    off = np.array(matrix, copy=True)
    np.fill_diagonal(off, 0)
    cells = np.flatnonzero(off)  # vectorised: a 1 000-class matrix has a million cells
    cells = cells[np.argsort(-off.flat[cells], kind="stable")][:limit]
    return [(classes[k // off.shape[1]], classes[k % off.shape[1]], int(off.flat[k])) for k in cells]


def top_k_accuracies(y_true: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Top-1, top-3 and top-5 accuracy, each only where there are more classes than k (top-1 always)."""
    labels = list(range(probs.shape[1]))
    if not len(y_true):
        return {"top1": 0.0}
    scores = {"top1": float((np.asarray(probs).argmax(1) == np.asarray(y_true)).mean())}
    # k >= 3 < classes means a multiclass problem, where sklearn's scorer takes the (N, C) matrix as is.
    scores.update({f"top{k}": float(top_k_accuracy_score(y_true, probs, k=k, labels=labels))
                   for k in (3, 5) if k < len(labels)})
    return scores


def _write_gallery(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                   paths: Sequence[Path], out: Path) -> list[int]:
    confidence = probs[np.arange(len(y_pred)), y_pred]
    worst = worst_mistakes(y_true, y_pred, confidence, GALLERY_LIMIT)
    if worst:
        tiles = [Tile(thumbnail(paths[i]), f"{Path(paths[i]).name}\ntrue {classes[y_true[i]]} "
                      f"({probs[i, y_true[i]]:.2f})\npred {classes[y_pred[i]]} ({confidence[i]:.2f})") for i in worst]
        wrong = int((y_true != y_pred).sum())
        plot_gallery(tiles, out, f"misclassified, most confident first ({len(worst)} of {wrong} mistakes)")
    return worst


def _write_gradcam(model: "LoadedModel", worst: list[int], y_true: np.ndarray, y_pred: np.ndarray,
                   classes: Sequence[str], paths: Sequence[Path], out: Path) -> bool:
    from finetune.inference.gradcam import grad_cam

    chosen = worst[:CAM_LIMIT]
    cams = grad_cam(model, [paths[i] for i in chosen], [int(y_pred[i]) for i in chosen])
    if not cams:
        return False
    tiles = []
    for i, cam in zip(chosen, cams):
        caption = f"{Path(paths[i]).name}\ntrue {classes[y_true[i]]}\npred {classes[y_pred[i]]}"
        tiles += [Tile(cam.image, caption), Tile(cam.image, f"Grad-CAM for {classes[y_pred[i]]}", cam.heat)]
    plot_gallery(tiles, out, f"where the model looked for its wrong answer (Grad-CAM on {cams[0].layer})",
                 columns=6)
    return True


def format_report(report: dict, classes: Sequence[str]) -> str:
    """The per-class table as text."""
    width = max(len(c) for c in list(classes) + ["weighted avg"])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name in list(classes) + ["macro avg", "weighted avg"]:
        row = report[name]
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1-score']:5.3f}  {int(row['support']):7d}"
        )
    lines.append(f"{'accuracy':<{width}}  {report['accuracy']:.4f}")
    return "\n".join(lines)


def write_evaluation(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    classes: Sequence[str],
    files: EvalFiles,
    probs: Optional[np.ndarray] = None,
    paths: Optional[Sequence[Path]] = None,
    model: Optional["LoadedModel"] = None,
    calibration: Optional[tuple[Optional[np.ndarray], float]] = None,
) -> dict:
    """Write the evaluation bundle into `files` and return the metrics.

    With `probs`: top-k accuracy and calibration; with `probs` and `paths`: the misclassified
    gallery; with `model` as well: Grad-CAM overlays of the worst mistakes. `calibration` is
    (the probabilities before temperature scaling or None, the temperature): it adds the ECE
    before scaling beside the ECE of `probs`.
    """
    files.prepare()
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0
    )
    report["accuracy"] = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    confused = most_confused(matrix, classes)
    summary: dict = {"images": int(len(y_true)), "classes": len(classes), "accuracy": report["accuracy"],
                     "macro_f1": float(report["macro avg"]["f1-score"])}
    uncalibrated, temperature = calibration if calibration is not None else (None, None)
    if probs is not None and len(y_true):
        summary.update(_probability_metrics(y_true, probs, uncalibrated, temperature))
    if files.writes:
        _write_tables(files, classes, matrix, confused, report)
        if paths is not None:
            files.write_csv(files.predictions, [["path", "true", "predicted", "confidence", "correct"], *(
                [str(path), classes[y_true[i]], classes[y_pred[i]],
                 float(probs[i, y_pred[i]]) if probs is not None else "", int(y_true[i] == y_pred[i])]
                for i, path in enumerate(paths))])
        if "calibration_bins" in summary:
            before = calibration_bins(uncalibrated, y_true) if uncalibrated is not None else None
            plot_reliability(calibration_bins(probs, y_true), files.reliability, before, temperature)
            plot_coverage(accuracy_coverage(probs, y_true), files.coverage_png)
            if paths is not None:
                worst = _write_gallery(y_true, y_pred, probs, classes, paths, files.misclassified)
                if model is not None and worst:
                    summary["gradcam"] = _write_gradcam(model, worst, y_true, y_pred, classes, paths, files.gradcam)
        files.write_json(files.metrics, summary)
    return {**summary, "report": report, "most_confused": confused, "confusion_matrix": matrix.tolist(),
            "out_dir": str(files.folder)}


def _probability_metrics(y_true: np.ndarray, probs: np.ndarray, uncalibrated: Optional[np.ndarray],
                         temperature: Optional[float]) -> dict:
    """Top-k accuracy, ECE (before and after temperature scaling) and the accuracy-coverage points."""
    bins = calibration_bins(probs, y_true)
    metrics: dict = {"top_k": top_k_accuracies(y_true, probs), "ece": bins.ece, "calibration_bins": bins.to_dict()}
    if temperature is not None:
        metrics["temperature"] = float(temperature)
    if uncalibrated is not None:
        metrics["ece_uncalibrated"] = calibration_bins(uncalibrated, y_true).ece
    metrics["coverage"] = accuracy_coverage(probs, y_true).to_dict()
    return metrics


def _write_tables(files: EvalFiles, classes: Sequence[str], matrix: np.ndarray, confused: list, report: dict) -> None:
    """The confusion matrix (PNG and CSV), the most confused pairs, per-class recall and the per-class report."""
    plot_confusion_matrix(matrix, classes, files.confusion_png)
    plot_confused_pairs(most_confused(matrix, classes, BARS), files.most_confused_png)
    plot_class_recall(matrix, classes, files.class_recall_png)
    files.write_csv(files.confusion_csv, [["true\\predicted", *classes],
                                          *([name, *row.tolist()] for name, row in zip(classes, matrix))])
    files.write_csv(files.most_confused, [["true", "predicted", "count"], *confused])
    files.write_json(files.report_json, report)


def summary_lines(metrics: dict, classes: Sequence[str]) -> list[str]:
    """The console view of an evaluation: per-class table, top-k and ECE, the most confused pairs."""
    lines = [format_report(metrics["report"], classes)]
    extras = [f"{k} {v:.4f}" for k, v in metrics.get("top_k", {}).items() if k != "top1"]
    if "ece" in metrics:
        extras.append(f"ECE {metrics['ece']:.4f}")
    if "ece_uncalibrated" in metrics:
        extras[-1] += f" (before temperature scaling {metrics['ece_uncalibrated']:.4f}, T={metrics['temperature']:.3f})"
    for target, point in (metrics.get("coverage", {}).get("targets") or {}).items():
        if point["threshold"] is not None:
            extras.append(f"{float(target):.0%} accuracy at {point['coverage']:.0%} coverage "
                          f"(--reject-below {point['threshold']:.3f})")
    if extras:
        lines.append(", ".join(extras))
    if metrics["most_confused"]:
        lines.append("most confused (true → predicted: count): " + ", ".join(
            f"{t} → {p}: {n}" for t, p, n in metrics["most_confused"][:5]))
    return lines


def evaluate_samples(loaded: "LoadedModel", samples: Sequence[Sample], files: EvalFiles, inference: InferenceOptions,
                     log: Callable[[str], None] = print, raw_probs: Optional[np.ndarray] = None,
                     skipped: Optional[list[SkippedImage]] = None) -> dict:
    """Predict labelled samples with a loaded model, write the bundle into `files`, log the summary; the metrics.

    Probabilities are calibrated with the checkpoint's temperature; `raw_probs` (the uncalibrated ones,
    already computed) saves running the model again. `inference.precision` bf16 runs it under bf16 autocast.
    Each image is decoded once, here: one that fails is left out of the metrics and appended to `skipped`.
    """
    from finetune.engine.temperature import apply_temperature
    from finetune.inference.predict import ProbsSettings, predict_probs

    temperature, settings = loaded.temperature, ProbsSettings.of(inference)
    failed: dict[Path, str] = {}
    raw = raw_probs if raw_probs is not None else predict_probs(loaded, samples, replace(settings, calibrated=False),
                                                                unreadable=failed)
    if settings.tta and temperature != 1.0:  # averaged views: rescaling the average is not the average of the rescaled
        probs = predict_probs(loaded, samples, settings)
    else:
        probs = apply_temperature(raw, temperature)
    if failed:
        keep = np.array([s.path not in failed for s in samples])
        samples, raw, probs = [s for s in samples if s.path not in failed], raw[keep], probs[keep]
        if skipped is not None:
            skipped.extend(SkippedImage(path, reason) for path, reason in failed.items())
        if not samples:
            raise FinetuneError("none of the labelled images could be decoded; see the list of skipped images")
    metrics = write_evaluation([s.target for s in samples], probs.argmax(1), loaded.classes, files, probs,
                               [s.path for s in samples], model=loaded,
                               calibration=(raw if temperature != 1.0 else None, temperature))
    for line in summary_lines(metrics, loaded.classes):
        log(line)
    log(f"evaluation written to {files.folder}")
    return metrics
