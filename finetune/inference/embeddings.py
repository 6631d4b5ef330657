"""Image embeddings: the backbone's pooled features (what the head reads), for finding duplicates and outliers and
for a linear classifier on frozen features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from finetune.data.loaders import make_loader
from finetune.data.preprocessing import Preprocessing
from finetune.inference.predict import images_dataset

__all__ = ["embed_images"]


@torch.no_grad()
def embed_images(model: nn.Module, preprocessing: Preprocessing, paths: Sequence[Path], batch_size: int = 64,
                 num_workers: int = 0, unreadable: Optional[dict[Path, str]] = None) -> np.ndarray:
    """The backbone features (N, F) of `paths`, in order, with the evaluation preprocessing (no augmentation).

    `model` is a Classifier (its `pre_logits` output). An image that does not decode gets the mean-colour image's
    features and is added to `unreadable` (path: reason) when given.
    """
    if not paths:
        return np.zeros((0, 0), dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = make_loader(images_dataset(list(paths), preprocessing), batch_size,
                         num_workers if len(paths) > batch_size else 0)
    chunks, start = [], 0
    try:
        for views, reasons in loader:  # one view per image: no TTA
            for offset, reason in enumerate(reasons):
                if reason and unreadable is not None:
                    unreadable[paths[start + offset]] = reason
            start += len(reasons)
            chunks.append(model(views[0].to(device), pre_logits=True).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks)
