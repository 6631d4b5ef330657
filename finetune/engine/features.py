"""Head-only epochs on cached backbone features: the frozen backbone runs once, not once per epoch.

When every trainable parameter is in the head, each epoch would push the same images through the same
frozen backbone (in eval mode: its BatchNorm statistics are fixed) only to train a small MLP on the
result. `FeatureCache` computes those features once, in eval mode under no_grad, then serves them as
batches; `fit` trains the head on them by switching the Classifier to take features as input.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.engine.step import autocast, to_device, train_precision
from finetune.config.recipe import TrainConfig

__all__ = ["FeatureCache", "features_in", "head_only"]


def head_only(trainable: set[str]) -> bool:
    """True when only head parameters train."""
    return bool(trainable) and all(name.startswith("head.") for name in trainable)


@contextmanager
def features_in(*models: nn.Module) -> Iterator[None]:
    """Let Classifiers take backbone features as input (the head runs alone) inside the block."""
    for model in models:
        model.features_in = True
    try:
        yield
    finally:
        for model in models:
            model.features_in = False


@torch.no_grad()
def _extract(model: nn.Module, loader: DataLoader, device: torch.device, cfg: TrainConfig) -> TensorDataset:
    was_training = model.training
    model.eval()  # the whole backbone in eval mode: fixed BatchNorm statistics, no dropout
    precision = train_precision(cfg, device)
    features, labels = [], []
    try:
        for images, targets in loader:
            images, targets = to_device(images, targets, device, cfg.channels_last)
            with autocast(device, precision):
                features.append(model(images, pre_logits=True).float())
            labels.append(targets)
    finally:
        model.train(was_training)
    return TensorDataset(torch.cat(features), torch.cat(labels))


class FeatureCache:
    """Backbone features of the training and validation images, computed on first use.

    `train_images`/`val_images` yield un-augmented (or deterministically augmented) batches; the head's
    training batches are then drawn from the features with `make_train_loader(dataset)`, which keeps the
    run's batch size, shuffling seed and sampler.
    """

    def __init__(self, train_images: DataLoader, val_images: DataLoader,
                 make_train_loader: Callable[[TensorDataset], DataLoader]) -> None:
        self.train_images, self.val_images = train_images, val_images
        self.make_train_loader = make_train_loader
        self._loaders: Optional[tuple[DataLoader, DataLoader]] = None

    def loaders(self, model: nn.Module, device: torch.device, cfg: TrainConfig,
                log: Callable[[str], None] = print) -> tuple[DataLoader, DataLoader]:
        """(training, validation) loaders of features; the backbone runs the first time only."""
        if self._loaders is None:
            start = time.perf_counter()
            train = _extract(model, self.train_images, device, cfg)
            val = _extract(model, self.val_images, device, cfg)
            batch_size = self.val_images.batch_size or 64
            # Its own generator: drawing a loader seed from the global stream would shift later dropout masks.
            self._loaders = (self.make_train_loader(train),
                             DataLoader(val, batch_size=batch_size, generator=torch.Generator().manual_seed(0)))
            log(f"head-only epochs train on cached backbone features ({len(train)} training, {len(val)} validation "
                f"images, computed once in {time.perf_counter() - start:.1f}s)")
        return self._loaders
