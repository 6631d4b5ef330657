"""Prepare data once: discover the samples, drop (and list) the files that are not images, count classes.

Training and evaluation decode each image once, in the loader: a file whose header reads but whose pixels
do not (truncated, damaged) is dropped from its batch there and listed (finetune.workflows.api.train / evaluate).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from finetune.data.images import SkippedImage, check_headers
from finetune.data.shards import INDEX_SUFFIX
from finetune.data.loaders import class_counts
from finetune.data.sources import VAL_NAMES, DatasetSplits, Keep, Sample, discover_shards, read_labelled_folder
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig, Recipe

__all__ = ["Prepared", "Discovery", "discover_splits", "prepare", "openable", "labelled", "read_exclusions",
           "excluding"]

Log = Callable[[str], None]


@dataclass
class Prepared:
    """Readable training and validation samples, their classes, and every image that was left out."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[SkippedImage]
    val_source: str = "folder"  # "folder", "split" or a k-fold description
    test_dir: Optional[Path] = None
    unlabeled_dir: Optional[Path] = None  # images without labels (data.unlabeled)

    @property
    def train_counts(self) -> list[int]:
        """Training images per class."""
        return class_counts(self.train, len(self.classes))

    @property
    def val_counts(self) -> list[int]:
        """Validation images per class."""
        return class_counts(self.val, len(self.classes))

    def describe(self) -> str:
        """One line: how many images of which kind, and where validation comes from."""
        return (f"found {len(self.train)} training and {len(self.val)} validation images in {len(self.classes)} "
                f"classes (validation: {self.val_source})")


def openable(samples: Sequence[Sample]) -> tuple[list[Sample], list[SkippedImage]]:
    """The samples whose file has an image header (no pixel decoded), and the ones that do not (with the reason)."""
    skipped = check_headers([s.path for s in samples])
    bad = {s.path for s in skipped}
    return [s for s in samples if s.path not in bad], skipped


def read_exclusions(cfg: DataConfig) -> tuple[Path, set[Path]]:
    """The `data.exclude` CSV and the resolved paths it lists (its `path` column, else its first)."""
    listed = Path(cfg.exclude or "").expanduser()
    root = Path(cfg.root or ".").expanduser()
    listed = listed if listed.is_absolute() else root / listed
    if not listed.is_file():
        raise FinetuneError(f"data.exclude names {listed}, which is not a file; give the CSV of images to leave out "
                            "(e.g. the excluded.csv of `finetune audit`)")
    with listed.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return listed, set()
    column = rows[0].index("path") if "path" in rows[0] else 0
    start = 1 if rows[0] and rows[0][column] == "path" else 0  # another header matches no image: harmless
    paths = {(root / row[column].strip()).resolve() for row in rows[start:]
             if len(row) > column and row[column].strip()}
    return listed, paths


def excluding(listed: Path, paths: set[Path], keep: Keep) -> Keep:
    """`keep`, after leaving out the samples whose file is among `paths` (each listed with the exclusion file)."""

    def kept(samples: Sequence[Sample]) -> tuple[list[Sample], list[SkippedImage]]:
        chosen, dropped = [], []
        for sample in samples:
            if sample.path.resolve() in paths:
                dropped.append(SkippedImage(sample.path, f"excluded by data.exclude ({listed})"))
            else:
                chosen.append(sample)
        usable, unreadable = keep(chosen)
        return usable, dropped + unreadable

    return kept


def _check_classes(prepared: Prepared, log: Log) -> None:
    counts = prepared.train_counts
    empty = [prepared.classes[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise FinetuneError(f"class(es) {empty} have no readable training images; add images or remove them")
    if max(counts) > 5 * min(counts):
        log(f"warning: classes are imbalanced (largest {max(counts)}, smallest {min(counts)} images); "
            "consider data.balance: sampler or loss")


class Discovery(Protocol):
    """What `prepare` needs of the task (finetune.tasks.Task): how it finds samples and stratifies the split."""

    split_kind: str

    def discover(self, cfg: DataConfig, seed: int, keep: Keep) -> DatasetSplits: ...


def discover_splits(cfg: DataConfig, task: Discovery, seed: int, keep: Keep) -> DatasetSplits:
    """The data as `task` reads it (`keep` filters files), or a shard set's, which were checked when they were
    written: nothing is listed or opened for shards."""
    return discover_shards(cfg) if cfg.layout == "shards" else task.discover(cfg, seed, keep)


def prepare(recipe: Recipe, task: Discovery, log: Log = print) -> Prepared:
    """The recipe's data as `task` reads it: discovered, header-checked (non-images dropped and kept in `skipped`),
    counted."""
    # Files that are not images are dropped before the validation split, so it holds val_fraction of the usable
    # ones; only the header is read here, the pixels are decoded once, by the training loader.
    keep: Keep = openable
    if recipe.data.exclude:
        listed, paths = read_exclusions(recipe.data)
        keep = excluding(listed, paths, openable)
        log(f"data.exclude: leaving out the {len(paths)} image(s) listed in {listed}")
    if recipe.data.layout == "auto" and recipe.data.root and (Path(recipe.data.root).expanduser() /
                                                              f"train{INDEX_SUFFIX}").is_file():
        recipe.data.layout = "shards"  # filled in, like data.image_size: the run's recipe.yaml says what was read
        recipe.data.validate()  # what shards refuse (data.exclude) is refused here too
        log(f"data.layout: shards ({recipe.data.root} holds train{INDEX_SUFFIX})")
    splits = discover_splits(recipe.data, task, recipe.train.seed, keep)
    val_source = splits.val_source
    if val_source == "split":
        val_source = f"{recipe.data.val_fraction:.0%} {task.split_kind} split"
    for note in splits.notes:
        log(note)
    prepared = Prepared(splits.classes, splits.train, splits.val, splits.skipped, val_source, splits.test_dir,
                        splits.unlabeled_dir)
    _check_classes(prepared, log)
    return prepared


def labelled(folder: Path, classes: Sequence[str], layout: str, label_regex: str) -> tuple[list[Sample],
                                                                                          list[SkippedImage]]:
    """Samples of a labelled folder (or its val/ sub-folder), labelled by a checkpoint's `classes`.

    Only headers are read here (files that are not images are left out, with the reason); the pixels
    are decoded once, when the images are scored.
    """
    if not folder.is_dir():
        raise FinetuneError(f"data folder not found: {folder}")
    for name in VAL_NAMES:
        if (folder / name).is_dir():
            folder = folder / name
            break
    found = read_labelled_folder(folder, layout if layout != "csv" else "auto", label_regex)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({name for _, name in found.items if name not in index})
    if unknown:
        raise FinetuneError(
            f"{folder} has classes {unknown[:10]} that the checkpoint does not know; it was trained on "
            f"{len(classes)} classes: {', '.join(list(classes)[:20])}. Use the matching checkpoint or data"
        )
    samples, not_images = openable([Sample(path, index[name]) for path, name in found.items])
    return samples, found.skipped + not_images
