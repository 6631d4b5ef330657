"""Calibration: expected calibration error and the reliability diagram of top-1 confidence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # not pyplot: see finetune.reports.plots

__all__ = ["CalibrationBins", "calibration_bins", "plot_reliability"]


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


def plot_reliability(bins: CalibrationBins, path: Path) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with a count histogram."""
    fig = Figure(figsize=(5.5, 6.5))
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
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram (ECE {bins.ece:.3f})")
    top.legend(loc="best", fontsize=8)
    bottom.bar(centres, bins.counts, width=width * 0.95, color="#55a868")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
