"""The training loss: cross-entropy with label smoothing and optional inverse-frequency class weights."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from finetune.config.recipe import Recipe

__all__ = ["create_criterion"]


def create_criterion(recipe: Recipe, class_counts: Sequence[int], device: torch.device) -> nn.Module:
    """CrossEntropyLoss; with `data.balance: loss` each class weighs total / (classes × its count)."""
    weight = None
    if recipe.data.balance == "loss":
        counts = torch.as_tensor(list(class_counts), dtype=torch.float32).clamp(min=1)
        weight = (counts.sum() / (len(counts) * counts)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.train.label_smoothing)
