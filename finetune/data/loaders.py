"""Datasets and DataLoaders: the one place that decides sampling (shuffled or class-balanced), batching and workers."""

from __future__ import annotations

import os
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune.data.cache import ImageCache
from finetune.data.cores import single_threaded_worker
from finetune.data.images import SkippedImage, load_rgb
from finetune.data.preprocessing import Preprocessing
from finetune.data.shard_members import ShardSamples
from finetune.data.sources import Sample
from finetune.data.transforms import (build_eval_transform, build_train_transform, eval_decode_side, seed_transform,
                                      train_decode_side)
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig, Recipe

__all__ = ["Targets", "class_index", "as_targets", "ImageDataset", "SkippingLoader", "collate_readable", "class_counts",
           "make_loader", "BalancedSampler", "balanced_sampler", "train_sampler", "train_transform", "image_reader", "train_reader", "train_loader",
           "tensor_train_loader", "eval_loader"]

Reader = Callable[[Path], np.ndarray]


def class_index(sample: Sample) -> int:
    """One label per image: the class index (-1 when unlabeled)."""
    return -1 if sample.target is None else int(sample.target)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Targets:
    """How the task turns samples into loss targets (`encode`, picklable for workers) and weighs them for
    `data.balance: sampler` (`balance_weights`: one weight per sample; default inverse class frequency)."""

    num_classes: int
    encode: Callable[[Sample], object] = class_index
    balance_weights: Optional[Callable[[Sequence[Sample]], np.ndarray]] = None

    def weights(self, samples: Sequence[Sample]) -> np.ndarray:
        """Per-sample drawing weights: each class (or, as the task says, each label) drawn equally often."""
        if self.balance_weights is not None:
            return self.balance_weights(samples)
        counts = np.asarray(class_counts(samples, self.num_classes), dtype=np.float64)
        return (1.0 / np.maximum(counts, 1.0))[[class_index(s) for s in samples]]


def as_targets(targets: Union[int, Targets]) -> Targets:
    """A class count means one class index per image."""
    return targets if isinstance(targets, Targets) else Targets(targets)


class PackedPaths:
    """Paths kept as one bytes block and an offset array, not a list of Path objects.

    A DataLoader worker is a fork of the main process: reading a Python object writes its reference count, and the
    page it sits on is copied into the worker. With a list of a million Path objects each worker ends an epoch with
    its own copy of all of them; reading a slice of one bytes block copies nothing.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self.block = b"".join(encoded)
        self.ends = np.cumsum([len(item) for item in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> Path:
        start = int(self.ends[index - 1]) if index > 0 else 0
        return Path(os.fsdecode(self.block[start:int(self.ends[index])]))


class ImageDataset(Dataset):
    """Decodes samples with `read` (default `load_rgb`) and applies an albumentations transform.

    Items are (image tensor, target) with the target as `encode` makes it (default: the class index,
    -1 when unlabeled). An image that fails to decode becomes a SkippedImage marker, which
    `collate_readable` drops from the batch and reports.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, read: Optional[Reader] = None,
                 encode: Callable[[Sample], object] = class_index) -> None:
        # A shard set's samples stay lazy (a worker makes the ones it reads, from the shared member table); a list
        # is packed.
        self.lazy = samples if isinstance(samples, ShardSamples) else None
        self.paths = PackedPaths([] if self.lazy is not None else [s.path for s in samples])
        # Class indices as one array; multi-label tuples (or None) stay a list.
        targets = [] if self.lazy is not None else [s.target for s in samples]
        self.targets = np.asarray(targets, dtype=np.int64) if all(type(t) is int for t in targets) else targets
        self.transform = transform
        self.read = read or load_rgb
        self.encode = encode

    def __len__(self) -> int:
        return len(self.lazy) if self.lazy is not None else len(self.paths)

    def sample(self, index: int) -> Sample:
        """The index-th sample, made when asked for."""
        if self.lazy is not None:
            return self.lazy[index]
        target = self.targets[index]
        return Sample(self.paths[index], int(target) if isinstance(target, np.integer) else target)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | SkippedImage:
        if self.lazy is not None:  # a shard's sample may lack its image or label: listed, like an unreadable file
            path, target, problem = self.lazy.entry(index)
            if problem is not None:
                return SkippedImage(path, problem)
            sample = Sample(path, target)
        else:
            sample = self.sample(index)
        try:
            image = self.read(sample.path)
        except FinetuneError as err:
            return SkippedImage(sample.path, str(err).split(": ", 1)[-1])
        tensor = self.transform(image=image)["image"]
        return tensor, self.encode(sample)


def collate_readable(items: list) -> tuple[torch.Tensor, torch.Tensor, list[SkippedImage]]:
    """Stack the decoded items; unreadable ones leave the batch and come back as the third element."""
    good = [item for item in items if not isinstance(item, SkippedImage)]
    bad = [item for item in items if isinstance(item, SkippedImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, bad


class SkippingLoader(DataLoader):
    """A DataLoader that yields (images, labels) and remembers every image that failed to decode.

    `skipped` holds each unreadable file once (by path), however many epochs met it; `on_skip`
    hears about a file the first time. A batch with no readable image is left out.
    """

    def __init__(self, *args, on_skip: Optional[Callable[[SkippedImage], None]] = None, **kwargs) -> None:
        super().__init__(*args, collate_fn=collate_readable, **kwargs)
        self.skipped: dict[Path, SkippedImage] = {}
        self.on_skip = on_skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in super().__iter__():
            for item in bad:
                if item.path not in self.skipped:
                    self.skipped[item.path] = item
                    if self.on_skip is not None:
                        self.on_skip(item)
            if len(labels):
                yield images, labels


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples per class index (a multi-label sample counts once for each of its classes); a shard set's
    from its index."""
    known = getattr(samples, "class_counts", None)
    if known is not None and len(known) == num_classes:
        return list(known)
    counts = Counter(i for s in samples for i in (s.target if isinstance(s.target, tuple) else (s.target,)))
    return [counts.get(i, 0) for i in range(num_classes)]


class BalancedSampler(DistributedSampler):
    """Each class drawn equally often (inverse-frequency weights, with replacement), sharded across ranks.

    Every rank draws the same indices from a generator seeded with (seed, epoch), then keeps its
    strided share, as DistributedSampler does with a permutation: together the ranks see one draw.
    """

    def __init__(self, dataset: Dataset, weights: torch.Tensor, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.weights = weights

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()
        indices += indices[: self.total_size - len(indices)]  # pad so every rank gets as many
        return iter(indices[self.rank:self.total_size:self.num_replicas])


def balanced_sampler(samples: Sequence[Sample], targets: Union[int, Targets], seed: int, rank: int = 0,
                     world: int = 1) -> BalancedSampler:
    """Draw each class equally often (the task's weights, with replacement); this rank's share."""
    sample_weights = torch.as_tensor(as_targets(targets).weights(samples), dtype=torch.double)
    return BalancedSampler(samples, sample_weights, seed, rank, world)  # type: ignore[arg-type]


def train_sampler(recipe: Recipe, samples: Sequence[Sample], targets: Union[int, Targets], rank: int = 0,
                  world: int = 1) -> DistributedSampler:
    """The training order: a permutation (or balanced draw) seeded by (train.seed, epoch), strided over ranks.

    The order depends on the seed and the epoch only (the loop calls `set_epoch`), so 2 processes with
    batch B each see the same global batches as 1 process with batch 2B, and a resumed run the same order.
    """
    seed = recipe.train.seed
    if recipe.data.balance == "sampler":
        return balanced_sampler(samples, targets, seed, rank, world)
    return DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]


def _seed_worker(worker_id: int) -> None:
    # Every worker gets a distinct, reproducible stream (torch seeds it from the loader's generator):
    # albumentations 2 pipelines keep their own random state, which a fork would otherwise copy into
    # every worker, so each would repeat the same augmentations; numpy/random for custom transforms.
    import random

    single_threaded_worker()  # the core budget counts a worker as one core
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    seed_transform(getattr(info.dataset, "transform", None), seed)
    sys.excepthook = _quiet_when_main_stops_reading


def _quiet_when_main_stops_reading(kind: type, value: BaseException, tb) -> None:
    # A worker hands each batch's tensors to the main process through multiprocessing's resource sharer,
    # whose thread reports a failed hand-over through sys.excepthook. After Ctrl-C the main process stops
    # reading mid-hand-over: that broken pipe is expected and must not print a traceback under "interrupted".
    if issubclass(kind, (BrokenPipeError, ConnectionResetError)):
        return
    sys.__excepthook__(kind, value, tb)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    seed: int = 0,
    sampler: Optional[torch.utils.data.Sampler] = None,
    drop_last: bool = False,
    on_skip: Optional[Callable[[SkippedImage], None]] = None,
) -> DataLoader:
    """A DataLoader with seeded shuffling and per-worker seeds (a SkippingLoader for an ImageDataset)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, ImageDataset):
        return SkippingLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                              num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                              worker_init_fn=_seed_worker, generator=generator, persistent_workers=num_workers > 0,
                              on_skip=on_skip)
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


def train_transform(recipe: Recipe, preprocessing: Preprocessing, seed: Optional[int] = None) -> Callable:
    """The recipe's training augmentation at the model's size, seeded from `seed` (default train.seed)."""
    aug = recipe.augment
    seed = recipe.train.seed if seed is None else seed
    return build_train_transform(preprocessing, aug.preset, aug.ops, aug.policy, seed=seed)


def tensor_train_loader(recipe: Recipe, dataset: torch.utils.data.TensorDataset, targets: Union[int, Targets],
                        rank: int = 0, world: int = 1) -> DataLoader:
    """Training batches of precomputed (features, target) pairs, drawn as train_loader draws images."""
    cfg, seed = recipe.data, recipe.train.seed
    encoded = dataset.tensors[1]
    # Back to samples, for the balanced sampler's weights: class indices, or the classes of multi-hot rows.
    samples = [Sample(Path(), int(t) if encoded.ndim == 1 else tuple(int(k) for k in torch.flatnonzero(t > 0.5)))
               for t in encoded]
    # The same sampler as the image loader's, so a cached epoch visits the samples in the same order.
    sampler = train_sampler(recipe, samples, targets, rank, world)
    return make_loader(dataset, cfg.batch_size, 0, seed=seed, sampler=sampler,
                       drop_last=len(sampler) > cfg.batch_size)


def image_reader(cfg: DataConfig, min_side: Optional[int], paths: Sequence[Path]) -> Reader:
    """How a loader decodes: `load_rgb` (JPEGs at reduced scale down to `min_side`), or through data.cache.

    A ram cache is filled here, in this process, so every DataLoader worker shares it.
    """
    if cfg.cache == "none":
        return partial(load_rgb, min_side=min_side)
    cache = ImageCache(cfg.cache, Path(cfg.cache_dir) if cfg.cache_dir else None, min_side)
    cache.fill(paths)
    return cache.read


def train_reader(recipe: Recipe, preprocessing: Preprocessing, paths: Sequence[Path] = ()) -> Reader:
    """Decode for training: no larger than the augmentation needs, cached as data.cache says."""
    aug = recipe.augment
    return image_reader(recipe.data, train_decode_side(preprocessing, aug.preset, aug.ops), paths)


def _cached_paths(recipe: Recipe, samples: Sequence[Sample]) -> Sequence[Path]:
    """The paths a ram cache fills (a lazy shard set is read through only when a cache is asked for)."""
    return [s.path for s in samples] if recipe.data.cache == "ram" else ()


def train_loader(recipe: Recipe, samples: Sequence[Sample], preprocessing: Preprocessing,
                 targets: Union[int, Targets], rank: int = 0, world: int = 1, seed: Optional[int] = None,
                 on_skip: Optional[Callable[[SkippedImage], None]] = None) -> DataLoader:
    """Augmented training batches for one rank (of `world`): shuffled, or class-balanced with `data.balance: sampler`.

    `data.batch_size` is per process. `seed` (default train.seed) seeds this rank's augmentation and workers;
    the sample order comes from train.seed alone (`train_sampler`). Images decode through `train_reader`
    (data.cache); `on_skip` hears of each image that fails to decode. `targets` (a class count, or the task's
    Targets) says how samples become loss targets.
    """
    cfg, targets = recipe.data, as_targets(targets)
    seed = recipe.train.seed if seed is None else seed
    sampler = train_sampler(recipe, samples, targets, rank, world)
    read = train_reader(recipe, preprocessing, _cached_paths(recipe, samples))
    dataset = ImageDataset(samples, train_transform(recipe, preprocessing, seed), read, targets.encode)
    return make_loader(dataset, cfg.batch_size, cfg.num_workers, seed=seed, sampler=sampler,
                       drop_last=len(sampler) > cfg.batch_size, on_skip=on_skip)


def eval_loader(samples: Sequence[Sample], preprocessing: Preprocessing, batch_size: int, num_workers: int,
                read: Optional[Reader] = None,
                on_skip: Optional[Callable[[SkippedImage], None]] = None,
                encode: Callable[[Sample], object] = class_index) -> DataLoader:
    """Batches in sample order with the evaluation preprocessing (JPEGs decoded no larger than it needs)."""
    read = read or partial(load_rgb, min_side=eval_decode_side(preprocessing))
    return make_loader(ImageDataset(samples, build_eval_transform(preprocessing), read, encode), batch_size,
                       num_workers, on_skip=on_skip)
