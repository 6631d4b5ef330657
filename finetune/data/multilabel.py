"""Several labels per image (data.task: multilabel): manifests, the held-out split, multi-hot batches and mixing.

A manifest holds either one label column whose cell lists the labels (``clear primary road``,
``a,b`` or ``a|b``; empty = no label) or one 0/1 column per class. Samples carry their class
indices in `Sample.target`; datasets turn them into multi-hot float targets.
"""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from finetune.data.images import SkippedImage
from finetune.data.sources import (DatasetSplits, Keep, Sample, find_child, ManifestImages,
                                   manifest_paths, sort_class_names, TEST_NAMES)
from finetune.errors import FinetuneError
from finetune.config.recipe import AugmentConfig, DataConfig

__all__ = ["split_labels", "read_multilabel_manifest", "check_single_label", "multilabel_split", "multi_hot",
           "discover_multilabel", "manifest_samples", "MultiHot", "MultiHotMixer", "create_multihot_mixer"]

_ANY_SEPARATOR = re.compile(r"[\s,|]+")
_BINARY = {"0", "1", "0.0", "1.0", ""}


def split_labels(text: str, sep: Optional[str] = None) -> list[str]:
    """The labels of one manifest cell: split on `sep`, or on any run of spaces, commas and `|`."""
    parts = text.split(sep) if sep else _ANY_SEPARATOR.split(text)
    return [p.strip() for p in parts if p.strip()]


def _read_rows(manifest: Path) -> tuple[list[str], list[dict]]:
    with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of the header
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _class_columns(cfg: DataConfig, columns: list[str], rows: list[dict], id_col: str) -> Optional[list[str]]:
    """The per-class 0/1 columns, when the manifest has that shape and no label column is named."""
    if cfg.csv_label_column is not None or len(columns) < 3:
        return None
    others = [c for c in columns if c != id_col]
    if all((row.get(c) or "").strip() in _BINARY for row in rows for c in others):
        return others
    return None


def read_multilabel_manifest(cfg: DataConfig, root: Path,
                             classes: Optional[Sequence[str]] = None) -> tuple[list[str], list[Sample],
                                                                               list[SkippedImage]]:
    """(classes, samples, skipped) of a multi-label manifest; `classes` fixes the class list (a checkpoint's)."""
    manifest, image_dir = manifest_paths(cfg, root)
    columns, rows = _read_rows(manifest)
    if len(columns) < 2:
        raise FinetuneError(f"{manifest} needs at least two columns (path or id, labels); found {columns}")
    id_col = cfg.csv_id_column or columns[0]
    per_class = _class_columns(cfg, columns, rows, id_col)
    label_col = None if per_class else (cfg.csv_label_column or columns[1])
    for col in [id_col] + ([label_col] if label_col else []):
        if col not in columns:
            raise FinetuneError(f"column '{col}' not in {manifest}; columns are {', '.join(columns)}")
    images = ManifestImages(image_dir)
    found: list[tuple[Path, tuple[str, ...]]] = []
    skipped: list[SkippedImage] = []
    seen: dict[tuple, tuple[Path, tuple[str, ...]]] = {}
    for row in rows:
        value = (row[id_col] or "").strip()
        if per_class:
            names = tuple(c for c in per_class if (row.get(c) or "").strip() in ("1", "1.0"))
        else:
            names = tuple(dict.fromkeys(split_labels(row[label_col] or "", cfg.csv_label_sep)))
        hit = images.find(value)
        if hit is None:
            skipped.append(SkippedImage(image_dir / value, "listed in the manifest but no such image file"))
            continue
        path, key = hit
        if key in seen:  # one file (symlinks and hard links alike) is one sample, as in every layout
            if set(seen[key][1]) != set(names):
                raise FinetuneError(f"{path} is listed twice in {manifest} with different labels "
                                    f"({' '.join(seen[key][1])} / {' '.join(names)}); keep one row per image")
            skipped.append(SkippedImage(path, f"same image as {seen[key][0]} with the same labels: used once"))
            continue
        seen[key] = (path, names)
        found.append((path, names))
    if not found:
        raise FinetuneError(f"no manifest row of {manifest} points to an image in {image_dir}")
    if classes is None:
        classes = list(per_class) if per_class else sort_class_names({n for _, names in found for n in names})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({n for _, names in found for n in names if n not in index})
    if unknown:
        raise FinetuneError(f"{manifest} has labels {unknown[:10]} that are not among the classes "
                            f"{list(classes)[:20]}; use the matching checkpoint or manifest")
    samples = [Sample(path, tuple(sorted(index[n] for n in names))) for path, names in found]
    return list(classes), samples, skipped


def check_single_label(cfg: DataConfig, root: Path) -> None:
    """Refuse a multi-label manifest read as one label per image (data.task single), saying what to set."""
    manifest, _ = manifest_paths(cfg, root)
    columns, rows = _read_rows(manifest)
    if len(columns) < 2:
        return  # read_manifest says what is wrong
    id_col = cfg.csv_id_column or columns[0]
    label_col = cfg.csv_label_column or columns[1]
    classes = {(row.get(label_col) or "").strip() for row in rows} - {""}
    per_class = _class_columns(cfg, columns, rows, id_col) if classes <= {"0", "1", "0.0", "1.0"} else None
    tokens = {t for name in classes for t in split_labels(name)}
    combined = sorted(name for name in classes if len(split_labels(name)) > 1)
    # "sea lion" and "sea otter" are single labels; "clear primary", "clear road", "primary" are combinations:
    # fewer distinct words than distinct cells means the words repeat as labels of their own.
    listed = [name for name in combined if re.search(r"[,|]", name)]  # "a|b", "a,b": a list, not one name
    if per_class or listed or (combined and len(tokens) < len(classes)):
        shape = (f"one 0/1 column per class ({', '.join(per_class[:5])}, ...)" if per_class else
                 f"several labels in one cell (e.g. '{combined[0]}')")
        raise FinetuneError(f"{manifest} looks multi-label: {shape}; set data.task: multilabel "
                            "(or give one label per row for data.task: single)")


def multi_hot(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    """The (N, C) 0/1 target matrix of multi-label samples."""
    matrix = np.zeros((len(samples), num_classes), dtype=np.float32)
    for row, sample in enumerate(samples):
        matrix[row, list(sample.target or ())] = 1.0
    return matrix


def multilabel_split(samples: Sequence[Sample], fraction: float, seed: int,
                     num_classes: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded hold-out by iterative stratification (Sechidis et al. 2011).

    The rarest label is placed first, each of its images going to the side that still lacks most of
    that label; every label with at least two images gets at least one in validation and one in training.
    """
    y = multi_hot(samples, num_classes)
    n, counts = len(samples), y.sum(0)
    rng = np.random.default_rng(seed)
    want_val = np.where(counts >= 2, np.clip(np.round(counts * fraction), 1, counts - 1), 0)
    need = np.stack([counts - want_val, want_val]).astype(float)  # remaining wish per side (0 train, 1 val)
    room = np.array([n - round(n * fraction), round(n * fraction)], dtype=float)
    side = np.full(n, -1)
    left = y.copy()
    while left.sum() > 0:
        remaining = left.sum(0)
        label = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        for i in rng.permutation(np.flatnonzero(left[:, label] > 0)):
            scores = np.stack([need[:, label], room, rng.random(2)], axis=1)
            chosen = int(max((0, 1), key=lambda s: tuple(scores[s])))
            side[i] = chosen
            need[chosen] -= y[i]
            room[chosen] -= 1
            left[i] = 0
    for i in rng.permutation(np.flatnonzero(side < 0)):  # images with no label: fill what room is left
        chosen = int(np.argmax(room))
        side[i] = chosen
        room[chosen] -= 1
    for label in np.flatnonzero(counts >= 2):  # the greedy pass can still leave a side without a label
        for lacking in (1, 0):
            if not (y[side == lacking, label] > 0).any():
                donors = np.flatnonzero((side != lacking) & (y[:, label] > 0))
                side[donors[np.argmin(y[donors].sum(1))]] = lacking
    train = [s for s, k in zip(samples, side) if k == 0]
    val = [s for s, k in zip(samples, side) if k == 1]
    if not train or not val:
        raise FinetuneError(f"only {n} images: too few to hold out a validation split; add images")
    return train, val


def discover_multilabel(cfg: DataConfig, seed: int = 0, keep: Optional[Keep] = None) -> DatasetSplits:
    """Training/validation samples of a multi-label manifest (the validation part held out by `multilabel_split`)."""
    if not cfg.root:
        raise FinetuneError("no dataset folder: pass --data DIR or set data.root in the recipe")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FinetuneError(f"dataset folder not found: {root}")
    classes, samples, skipped = read_multilabel_manifest(cfg, root)
    if len(classes) < 2:
        raise FinetuneError(f"the manifest names {len(classes)} label(s) ({', '.join(classes)}); a multi-label "
                            "classifier needs at least two")
    keep = keep or (lambda found: (list(found), []))
    samples, dropped = keep(samples)
    train, val = multilabel_split(samples, cfg.val_fraction, seed, len(classes))
    return DatasetSplits(classes, train, val, "split", find_child(root, cfg.test, TEST_NAMES), skipped + dropped)


def manifest_samples(data: Path, cfg: DataConfig, classes: Sequence[str]) -> tuple[list[Sample], list[SkippedImage]]:
    """Labelled samples for evaluation: `data` is a manifest CSV, or a folder holding the recipe's manifest name."""
    data = data.resolve()
    if data.is_file():
        manifest = data
    elif data.is_dir() and (data / Path(cfg.csv or "").name).is_file():
        manifest = data / Path(cfg.csv or "").name
    else:
        raise FinetuneError(f"{data} is neither a manifest CSV nor a folder holding {Path(cfg.csv or '').name}; "
                            "a multi-label model is evaluated on a CSV manifest with the labels of each image")
    image_dir = cfg.csv_image_dir if cfg.csv_image_dir and (manifest.parent / cfg.csv_image_dir).is_dir() else None
    local = replace(cfg, root=str(manifest.parent), csv=str(manifest), csv_image_dir=image_dir)
    _, samples, skipped = read_multilabel_manifest(local, manifest.parent, classes)
    return samples, skipped


class MultiHot:
    """A sample's multi-hot float target (C,): the loss target of several labels per image (picklable for workers)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, sample: Sample) -> torch.Tensor:
        target = torch.zeros(self.num_classes)
        target[list(sample.target or ())] = 1.0  # type: ignore[arg-type]
        return target


class MultiHotMixer:
    """Mixup or CutMix (one per batch, with probability `prob`) on images and their multi-hot targets.

    Each image is mixed with its neighbour in the batch (as torchvision's v2.MixUp/CutMix do); the
    targets mix with the same weight, so a label kept by half the pixels becomes a 0.5 target.
    """

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0) -> None:
        self.prob = prob
        self.ops = [name for name, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
        self.alpha = {"mixup": mixup, "cutmix": cutmix}
        if not self.ops:
            raise ValueError("MultiHotMixer needs mixup > 0 or cutmix > 0")

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and targets for a batch (N, C, H, W) and multi-hot targets (N, classes)."""
        targets = targets.to(images.dtype)
        if torch.rand(()).item() >= self.prob:
            return images, targets
        op = self.ops[int(torch.randint(len(self.ops), ()).item())]
        alpha = self.alpha[op]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        other_images, other_targets = images.roll(1, 0), targets.roll(1, 0)
        if op == "mixup":
            return images * lam + other_images * (1 - lam), targets * lam + other_targets * (1 - lam)
        h, w = images.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half_h, half_w = int(h * (1 - lam) ** 0.5 / 2), int(w * (1 - lam) ** 0.5 / 2)
        y0, y1, x0, x1 = max(cy - half_h, 0), min(cy + half_h, h), max(cx - half_w, 0), min(cx + half_w, w)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = other_images[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of pixels each image really kept
        return mixed, targets * lam + other_targets * (1 - lam)


def create_multihot_mixer(cfg: AugmentConfig) -> Optional[MultiHotMixer]:
    """The recipe's mixer for multi-hot targets, or None when mixup and cutmix are off."""
    if (cfg.mixup <= 0 and cfg.cutmix <= 0) or cfg.mix_prob <= 0:
        return None
    return MultiHotMixer(cfg.mixup, cfg.cutmix, cfg.mix_prob)
