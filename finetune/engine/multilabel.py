"""Several labels per image in training: the binary loss, the per-epoch metrics, and per-class thresholds."""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from finetune.config.recipe import Recipe

__all__ = ["BinaryLoss", "create_multilabel_criterion", "mean_average_precision", "sample_f1", "best_thresholds",
           "MultiLabelScorer"]


class BinaryLoss(nn.Module):
    """BCEWithLogitsLoss with label smoothing for binary targets: 1 → 1 - ε/2, 0 → ε/2."""

    def __init__(self, smoothing: float = 0.0, pos_weight: Union[torch.Tensor, None] = None) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy over every image and class."""
        targets = targets.to(logits.dtype)
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)


def create_multilabel_criterion(recipe: Recipe, label_counts: Sequence[int], images: int,
                                device: torch.device) -> nn.Module:
    """The binary loss; with `data.balance: loss` each class's positives weigh negatives / positives (≤ 100)."""
    pos_weight = None
    if recipe.data.balance == "loss":
        positives = torch.as_tensor(list(label_counts), dtype=torch.float32).clamp(min=1)
        # Capped: a label on 1 of 10 000 images would otherwise dominate every batch's gradient.
        pos_weight = ((images - positives).clamp(min=1) / positives).clamp(max=100.0).to(device)
    return BinaryLoss(recipe.train.label_smoothing, pos_weight).to(device)


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """(mAP, per-class AP): average precision per class, averaged over the classes that have a positive."""
    from sklearn.metrics import average_precision_score

    targets, scores = np.asarray(targets) > 0.5, np.asarray(scores, dtype=np.float64)
    per_class = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        if targets[:, c].any():  # AP is undefined without a positive
            per_class[c] = average_precision_score(targets[:, c], scores[:, c])
    present = per_class[~np.isnan(per_class)]
    return (float(present.mean()) if present.size else 0.0), per_class


def sample_f1(targets: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 of each image's predicted label set against its true set (both empty counts as 1, as on Kaggle)."""
    t, p = np.asarray(targets) > 0.5, np.asarray(predicted) > 0.5
    hits = (t & p).sum(1)
    size = t.sum(1) + p.sum(1)
    return np.where(size == 0, 1.0, 2 * hits / np.maximum(size, 1))


def best_thresholds(targets: np.ndarray, probs: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per class, the probability cut that maximises that class's F1 on (validation) data.

    Candidates are midpoints between sorted probabilities; a class without positives keeps `default`.
    """
    targets, probs = np.asarray(targets) > 0.5, np.asarray(probs, dtype=np.float64)
    cuts = np.full(probs.shape[1], default)
    for c in range(probs.shape[1]):
        positives = int(targets[:, c].sum())
        if positives == 0:
            continue
        order = np.argsort(-probs[:, c], kind="stable")
        p, t = probs[order, c], targets[order, c]
        hits = np.cumsum(t)  # predicting the top k as positive: hits true positives among k
        k = np.arange(1, len(p) + 1)
        f1 = 2 * hits / (k + positives)
        # Only cut where the next probability differs, so ties stay on one side of the threshold.
        valid = np.append(p[:-1] > p[1:], True)
        best = int(np.argmax(np.where(valid, f1, -1)))
        cuts[c] = (p[best] + p[best + 1]) / 2 if best + 1 < len(p) else p[best] / 2
    return cuts


class MultiLabelScorer:
    """What the fit loop reports for multi-hot targets: exact-match accuracy per batch, mAP and F1 per epoch."""

    metrics = ("val_map", "val_f1")

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        """Images whose predicted label set (sigmoid > threshold) equals the true set (targets > 0.5)."""
        predicted = torch.sigmoid(logits.float()) > self.threshold
        return int((predicted == (targets > 0.5)).all(1).sum().item())

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """val_map (mean average precision) and val_f1 (mean per-image F1 at the threshold) of a whole pass."""
        probs = torch.sigmoid(logits.float()).numpy()
        truth = targets.numpy()
        return {"val_map": mean_average_precision(truth, probs)[0],
                "val_f1": float(sample_f1(truth, probs > self.threshold).mean()) if len(truth) else 0.0}
