"""Calibration: expected calibration error and the reliability diagram of top-1 confidence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from finetune.outputs.figures.canvas import new_figure

__all__ = ["CalibrationBins", "calibration_bins", "plot_reliability", "Coverage", "accuracy_coverage",
           "plot_coverage", "TARGET_ACCURACIES"]

TARGET_ACCURACIES = (0.9, 0.95, 0.99)  # the thresholds metrics.json names: the usual "how sure must it be" asks


@dataclass
class CalibrationBins:
    """Equal-width confidence bins: how many predictions, their mean confidence and their accuracy."""

    edges: np.ndarray  # n_bins + 1 edges from 0 to 1
    counts: np.ndarray
    confidence: np.ndarray  # mean top-1 confidence per bin (0 where empty)
    accuracy: np.ndarray  # fraction correct per bin (0 where empty)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy − confidence| gap."""
        total = self.counts.sum()
        return float((self.counts * np.abs(self.accuracy - self.confidence)).sum() / total) if total else 0.0

    def to_dict(self) -> dict:
        """Plain lists, for JSON."""
        return {"edges": self.edges.round(6).tolist(), "counts": self.counts.tolist(),
                "confidence": self.confidence.round(6).tolist(), "accuracy": self.accuracy.round(6).tolist()}


def calibration_bins(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 15) -> CalibrationBins:
    """Bin the top-1 confidences into (lo, hi] intervals (15 bins, as in Guo et al. 2017)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    safe = np.maximum(counts, 1)
    return CalibrationBins(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        counts=counts,
        confidence=np.bincount(which, weights=confidence, minlength=n_bins) / safe,
        accuracy=np.bincount(which, weights=correct, minlength=n_bins) / safe,
    )


def plot_reliability(bins: CalibrationBins, path: Path, before: Optional[CalibrationBins] = None,
                     temperature: Optional[float] = None) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with a count histogram.

    `before`: the bins before temperature scaling, drawn as dotted outlines of their accuracy.
    """
    fig = new_figure(figsize=(5.5, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins.edges[1] - bins.edges[0]
    centres = bins.edges[:-1] + width / 2
    filled = bins.counts > 0
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.bar(centres[filled], bins.accuracy[filled], width=width * 0.95, color="#4c72b0", edgecolor="black",
            label="accuracy of the bin")
    # Mean confidence as a marker rather than a second bar: the gap to the bar top is the miscalibration.
    top.scatter(centres[filled], bins.confidence[filled], marker="_", s=260, linewidths=2.5, color="#c44e52",
                zorder=3, label="mean confidence of the bin")
    title = f"reliability diagram (ECE {bins.ece:.3f})"
    if before is not None:
        shown = before.counts > 0
        # The same binning before scaling: where its outline leaves the diagonal, the raw model was off.
        top.bar(centres[shown], before.accuracy[shown], width=width * 0.95, fill=False, edgecolor="grey",
                linestyle=":", linewidth=1.5, label="accuracy of the bin before temperature scaling")
        title = f"reliability (ECE {bins.ece:.3f}; before T={temperature or 1.0:.2f}: {before.ece:.3f})"
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title, fontsize=10)
    top.legend(loc="best", fontsize=8)
    bottom.bar(centres, bins.counts, width=width * 0.95, color="#55a868")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@dataclass
class Coverage:
    """Accuracy of the predictions kept when only those at or above a confidence threshold are kept."""

    thresholds: np.ndarray  # confidences, high to low (one per image)
    coverage: np.ndarray  # share of images kept at each threshold
    accuracy: np.ndarray  # accuracy of the kept images at each threshold

    def threshold_for(self, target: float) -> tuple[Optional[float], float]:
        """(lowest threshold whose kept images reach `target` accuracy, its coverage); (None, 0) if none does."""
        reached = np.flatnonzero(self.accuracy >= target)
        if not len(reached):
            return None, 0.0
        k = reached[-1]
        return float(self.thresholds[k]), float(self.coverage[k])

    def to_dict(self) -> dict:
        """For metrics.json: the threshold for each target accuracy, and the curve at 21 coverages."""
        targets = {}
        for target in TARGET_ACCURACIES:
            threshold, kept = self.threshold_for(target)
            targets[f"{target:g}"] = {"threshold": None if threshold is None else round(threshold, 6),
                                      "coverage": round(kept, 6)}
        n = len(self.coverage)
        marks = sorted({max(int(round(c * n)) - 1, 0) for c in np.linspace(0.05, 1.0, 20)}) if n else []
        return {"targets": targets,
                "curve": [{"coverage": round(float(self.coverage[k]), 4), "accuracy": round(float(self.accuracy[k]), 6),
                           "threshold": round(float(self.thresholds[k]), 6)} for k in marks]}


def accuracy_coverage(probs: np.ndarray, y_true: Sequence[int]) -> Coverage:
    """Accuracy against coverage: sort by top-1 confidence and keep the most confident first.

    Ties in confidence are kept or rejected together (a threshold cannot split them), so the curve is
    evaluated at the last image of each run of equal confidences.
    """
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    kept = np.arange(1, len(order) + 1)
    accuracy = np.cumsum(correct) / np.maximum(kept, 1)
    last_of_tie = np.append(confidence[1:] != confidence[:-1], True) if len(order) else np.zeros(0, bool)
    # At a tie, every image of the run shares the accuracy and coverage of keeping the whole run.
    index = np.flatnonzero(last_of_tie)
    fill = np.searchsorted(index, np.arange(len(order)))
    return Coverage(confidence, kept[index][fill] / max(len(order), 1), accuracy[index][fill])


def plot_coverage(curve: Coverage, path: Path) -> None:
    """Accuracy of the kept predictions against the share kept, with the thresholds for the target accuracies."""
    fig = new_figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.plot(curve.coverage, curve.accuracy, color="#4c72b0")
    for target in TARGET_ACCURACIES:
        threshold, kept = curve.threshold_for(target)
        if threshold is not None:
            ax.scatter([kept], [target], color="#c44e52", zorder=3)
            ax.annotate(f"{target:.0%}: keep p >= {threshold:.2f} ({kept:.0%})", (kept, target), fontsize=8,
                        textcoords="offset points", xytext=(-10, -14), ha="right")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of images kept)")
    ax.set_ylabel("accuracy of the kept images")
    ax.set_title("accuracy against coverage (reject below a confidence threshold)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
