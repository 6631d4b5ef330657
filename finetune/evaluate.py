"""Evaluation bundle: confusion matrix (PNG + CSV), per-class report, most-confused pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from finetune.reports.plots import plot_confusion_matrix

__all__ = ["most_confused", "write_evaluation", "format_report"]


def most_confused(matrix: np.ndarray, classes: Sequence[str], limit: int = 10) -> list[tuple[str, str, int]]:
    """(true, predicted, count) for the largest off-diagonal cells, largest first."""
    pairs = [
        (classes[i], classes[j], int(matrix[i, j]))
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and matrix[i, j] > 0
    ]
    return sorted(pairs, key=lambda p: -p[2])[:limit]


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
    out_dir: Path,
    probs: Optional[np.ndarray] = None,
    paths: Optional[Sequence[Path]] = None,
) -> dict:
    """Write the evaluation files into `out_dir` and return the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0
    )
    report["accuracy"] = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    plot_confusion_matrix(matrix, classes, out_dir / "confusion_matrix.png")
    with (out_dir / "confusion_matrix.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, matrix):
            writer.writerow([name, *row.tolist()])
    confused = most_confused(matrix, classes)
    with (out_dir / "most_confused.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true", "predicted", "count"])
        writer.writerows(confused)
    (out_dir / "classification_report.json").write_text(json.dumps(report, indent=2))
    if paths is not None:
        with (out_dir / "predictions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "true", "predicted", "confidence", "correct"])
            for i, path in enumerate(paths):
                confidence = float(probs[i, y_pred[i]]) if probs is not None else ""
                writer.writerow([str(path), classes[y_true[i]], classes[y_pred[i]], confidence, int(y_true[i] == y_pred[i])])
    return {
        "accuracy": report["accuracy"],
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "report": report,
        "most_confused": confused,
        "confusion_matrix": matrix.tolist(),
        "out_dir": str(out_dir),
    }
