"""Datasets and DataLoaders: the one place that decides sampling (shuffled or class-balanced), batching and workers."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from finetune.data.images import load_rgb
from finetune.data.preprocessing import Preprocessing
from finetune.data.sources import Sample
from finetune.data.transforms import build_eval_transform, build_train_transform, seed_transform
from finetune.recipe import Recipe

__all__ = ["ImageDataset", "class_counts", "make_loader", "balanced_sampler", "train_transform", "train_loader",
           "eval_loader"]


class ImageDataset(Dataset):
    """Decodes samples with `load_rgb` and applies an albumentations transform.

    Items are (image tensor, label); unlabeled samples get label -1.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        tensor = self.transform(image=image)["image"]
        return tensor, -1 if sample.label is None else sample.label


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples per class index (a multi-label sample counts once for each of its classes)."""
    counts = Counter(i for s in samples for i in (s.labels if s.labels is not None else (s.label,)))
    return [counts.get(i, 0) for i in range(num_classes)]


def balanced_sampler(samples: Sequence[Sample], num_classes: int, seed: int) -> WeightedRandomSampler:
    """Draw each class equally often (inverse-frequency weights, with replacement)."""
    counts = np.asarray(class_counts(samples, num_classes), dtype=np.float64)
    weights = 1.0 / np.maximum(counts, 1.0)
    sample_weights = torch.as_tensor([weights[s.label] for s in samples], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(sample_weights, num_samples=len(samples), replacement=True, generator=generator)


def _seed_worker(worker_id: int) -> None:
    # Every worker gets a distinct, reproducible stream (torch seeds it from the loader's generator):
    # albumentations 2 pipelines keep their own random state, which a fork would otherwise copy into
    # every worker, so each would repeat the same augmentations; numpy/random for custom transforms.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    seed_transform(getattr(info.dataset, "transform", None), seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    seed: int = 0,
    sampler: Optional[torch.utils.data.Sampler] = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with seeded shuffling and per-worker seeds."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def train_transform(recipe: Recipe, preprocessing: Preprocessing) -> Callable:
    """The recipe's training augmentation at the model's size, seeded from train.seed."""
    aug = recipe.augment
    return build_train_transform(preprocessing, aug.preset, aug.ops, aug.policy, seed=recipe.train.seed)


def train_loader(recipe: Recipe, samples: Sequence[Sample], preprocessing: Preprocessing,
                 num_classes: int) -> DataLoader:
    """Augmented training batches: shuffled, or class-balanced with `data.balance: sampler`; seeded from train.seed."""
    cfg, seed = recipe.data, recipe.train.seed
    sampler = balanced_sampler(samples, num_classes, seed) if cfg.balance == "sampler" else None
    return make_loader(ImageDataset(samples, train_transform(recipe, preprocessing)), cfg.batch_size,
                       cfg.num_workers, shuffle=True, seed=seed, sampler=sampler,
                       drop_last=len(samples) > cfg.batch_size)


def eval_loader(samples: Sequence[Sample], preprocessing: Preprocessing, batch_size: int,
                num_workers: int) -> DataLoader:
    """Batches in sample order with the evaluation preprocessing."""
    return make_loader(ImageDataset(samples, build_eval_transform(preprocessing)), batch_size, num_workers)
