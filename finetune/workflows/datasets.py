"""Real labelled images offline: Fashion-MNIST exported as a folder data set with a Kaggle-style test set.

The layout written is the one `finetune train` reads: ``train/<class>/*.png``, ``val/<class>/*.png``,
an unlabeled ``test/00001.png ...`` and, outside ``test/``, the answers in ``test_truth.csv``
(``Id,Category``, like a private leaderboard) so a submission can be scored.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from finetune.errors import FinetuneError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTExport",
    "FashionMNISTSplit",
    "LAYOUTS",
    "MosaicExport",
    "describe",
    "describe_mosaics",
    "export_fashion_mnist_mosaics",
    "export_fashion_mnist",
    "load_fashion_mnist",
]

# Folder-safe versions of the official names ("T-shirt/top", "Ankle boot").
FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_MANIFEST = "export.json"

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# The demo's few-shot size, shared by `finetune datasets fashion-mnist`, `finetune demo` and their CLI help.
DEFAULT_PER_CLASS = 100
DEFAULT_VAL_PER_CLASS = 20


@dataclass(frozen=True)
class FashionMNISTSplit:
    """How many Fashion-MNIST images an export draws for each split.

    Attributes:
        per_class: training images per class.
        val_per_class: validation images per class.
        test_limit: first K test images (None: all 10 000).
    """

    per_class: int = DEFAULT_PER_CLASS
    val_per_class: int = DEFAULT_VAL_PER_CLASS
    test_limit: Optional[int] = None


@dataclass
class FashionMNISTExport:
    """Where an export put its files and how many images each split holds."""

    root: Path
    train_dir: Path
    val_dir: Path
    test_dir: Path
    truth_csv: Path
    classes: list[str]
    counts: dict[str, int]
    source: str
    reused: bool = False
    unlabeled_dir: Optional[Path] = None  # --unlabeled N: the pool without labels (HW03 2021 layout)
    unlabeled_truth: Optional[Path] = None  # its answers, kept outside the pool (Id,Category)


LAYOUTS = ("folders", "hw03-2021")  # train/ val/ test/, or training/labeled/ training/unlabeled/00/ ... testing/00/


def _paths(root: Path, layout: str) -> tuple[Path, Path, Path, Path, Path]:
    """(train, val, test, unlabeled, unlabeled truth) folders/files of an export in `layout`."""
    if layout == "hw03-2021":
        return (root / "training" / "labeled", root / "validation", root / "testing" / "00",
                root / "training" / "unlabeled" / "00", root / "unlabeled_truth.csv")
    return root / "train", root / "val", root / "test", root / "unlabeled", root / "unlabeled_truth.csv"


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format) from a gzip file."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise FinetuneError(f"{path} is not an IDX file of unsigned bytes (is the download corrupt?)")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise FinetuneError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _read_folder(folder: Path) -> Arrays:
    arrays = [_read_idx(folder / _FILES[key]) for key in ("train_images", "train_labels", "test_images", "test_labels")]
    return arrays[0], arrays[1].astype(np.int64), arrays[2], arrays[3].astype(np.int64)


def _download(root: Path) -> Arrays:
    """Fashion-MNIST through torchvision's downloader (needs network)."""
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=True)
    test = FashionMNIST(str(root), train=False, download=True)
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()


def load_fashion_mnist(
    source: Optional[Union[str, Path]] = None, cache: Optional[Union[str, Path]] = None
) -> tuple[Arrays, str]:
    """Train/test images and labels, from `source` (default: Debian's files) or else a download into `cache`."""
    folder = Path(source).expanduser() if source else DEBIAN_FASHION_MNIST
    if all((folder / name).is_file() for name in _FILES.values()):
        return _read_folder(folder), str(folder)
    cache = Path(cache).expanduser() if cache else Path.home() / ".cache" / "finetune" / "fashion-mnist"
    try:
        return _download(cache), f"torchvision download ({cache})"
    except (OSError, RuntimeError) as err:  # URLError/HTTPError are OSErrors; torchvision raises RuntimeError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FinetuneError(
            f"Fashion-MNIST not found in {folder} (expected {', '.join(_FILES.values())}) and the download failed "
            f"({reason}). Install it offline with `sudo apt install dataset-fashion-mnist`, pass a folder holding "
            "those four files with --source DIR, or connect to the internet"
        ) from None


def _pick_unlabeled(count: int, labels: np.ndarray, taken: list, rng: np.random.Generator) -> list:
    """`count` seeded indices from the training images not already used, uniformly (the classes as they come)."""
    rest = np.setdiff1d(np.arange(len(labels)), np.asarray(taken, dtype=np.int64))
    if count > len(rest):
        raise FinetuneError(f"asked for {count} unlabeled images but only {len(rest)} training images are left "
                            "after the labelled ones; lower --unlabeled")
    return sorted(rng.choice(rest, size=count, replace=False).tolist())


def _write_pool(folder: Path, truth_csv: Path, images: np.ndarray, labels: np.ndarray, indices: list) -> None:
    """Unlabeled images u00001.png... in `folder`, their answers in `truth_csv` (outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    with truth_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Id", "Category"])
        for n, i in enumerate(indices, 1):
            image_id = f"u{n:05d}"
            Image.fromarray(images[i]).save(folder / f"{image_id}.png")
            writer.writerow([image_id, FASHION_MNIST_CLASSES[labels[i]]])


def _pick(labels: np.ndarray, per_class: int, val_per_class: int, rng: np.random.Generator) -> tuple[list, list]:
    """Disjoint, seeded train/val indices: `per_class` and `val_per_class` of each class."""
    train_idx, val_idx = [], []
    for label in range(len(FASHION_MNIST_CLASSES)):
        pool = rng.permutation(np.flatnonzero(labels == label))
        if per_class + val_per_class > len(pool):
            raise FinetuneError(
                f"asked for {per_class} training + {val_per_class} validation images per class, but class "
                f"{FASHION_MNIST_CLASSES[label]} has only {len(pool)}; lower --per-class or --val-per-class"
            )
        train_idx.append(pool[:per_class])
        val_idx.append(pool[per_class: per_class + val_per_class])
    return list(np.concatenate(train_idx)), list(np.concatenate(val_idx))


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: list) -> None:
    for name in FASHION_MNIST_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i]).save(root / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png")


def _check_settings(split: FashionMNISTSplit, unlabeled: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise FinetuneError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if unlabeled < 0:
        raise FinetuneError("--unlabeled must be 0 or more")
    if split.per_class < 1 or split.val_per_class < 1:
        raise FinetuneError("--per-class and --val-per-class must be at least 1")
    if split.test_limit is not None and split.test_limit < 1:
        raise FinetuneError("--test-limit must be at least 1 (or left out for all 10 000 test images)")


def _write_test(test_dir: Path, truth_csv: Path, images: np.ndarray, labels: np.ndarray, count: int) -> None:
    """The first `count` test images as test/00001.png..., unlabeled; their answers in `truth_csv` (outside it)."""
    test_dir.mkdir(parents=True, exist_ok=True)
    with truth_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Id", "Category"])
        for i in range(count):
            image_id = f"{i + 1:05d}"
            Image.fromarray(images[i]).save(test_dir / f"{image_id}.png")
            writer.writerow([image_id, FASHION_MNIST_CLASSES[labels[i]]])


def _earlier_export(manifest: Path, settings: dict) -> Optional[dict]:
    """The manifest of an export made with the same settings, or None."""
    if not manifest.is_file():
        return None
    try:
        done = json.loads(manifest.read_text())
    except ValueError:
        return None  # a damaged manifest: not reusable, and the folder is not empty (the caller refuses it)
    return done if done.get("settings") == settings else None


def export_fashion_mnist(
    out_dir: Union[str, Path],
    split: Optional[FashionMNISTSplit] = None,
    seed: int = 0,
    source: Optional[Union[str, Path]] = None,
    reuse: bool = False,
    unlabeled: int = 0,
    layout: str = "folders",
) -> FashionMNISTExport:
    """Write a Fashion-MNIST folder data set (train/, val/, unlabeled test/, test_truth.csv) into `out_dir`.

    `split.per_class` / `split.val_per_class` images per class are drawn (seeded, disjoint) from the 60 000
    training images; test/ holds the first `split.test_limit` of the 10 000 test images (all by default).
    `unlabeled` more training images (disjoint from both) form a pool without labels, their answers kept
    apart in unlabeled_truth.csv. `layout` hw03-2021 writes HW03's 2021 tree: training/labeled/<class>/,
    training/unlabeled/00/, validation/<class>/, testing/00/. With `reuse`, an existing export made
    with the same settings is returned as it is.
    """
    split = split or FashionMNISTSplit()
    _check_settings(split, unlabeled, layout)
    root = Path(out_dir).expanduser()
    train_dir, val_dir, test_dir, pool_dir, pool_truth = _paths(root, layout)
    truth_csv = root / "test_truth.csv"
    settings = {"per_class": split.per_class, "val_per_class": split.val_per_class, "test_limit": split.test_limit,
                "seed": seed}
    if unlabeled or layout != "folders":  # older exports' manifests stay reusable
        settings.update(unlabeled=unlabeled, layout=layout)
    pool_paths = (pool_dir, pool_truth) if unlabeled else (None, None)
    manifest = root / _MANIFEST
    done = _earlier_export(manifest, settings) if reuse else None
    if done is not None:
        return FashionMNISTExport(root, train_dir, val_dir, test_dir, truth_csv, list(FASHION_MNIST_CLASSES),
                                  done["counts"], done["source"], True, *pool_paths)
    if root.exists() and any(root.iterdir()):
        raise FinetuneError(f"{root} already exists and is not empty; choose another --out or delete it")

    (train_x, train_y, test_x, test_y), origin = load_fashion_mnist(source)
    train_idx, val_idx = _pick(train_y, split.per_class, split.val_per_class, np.random.default_rng(seed))
    _write_split(train_dir, train_x, train_y, train_idx)
    _write_split(val_dir, train_x, train_y, val_idx)
    pool_idx = _pick_unlabeled(unlabeled, train_y, train_idx + val_idx, np.random.default_rng(seed + 1))
    if unlabeled:
        _write_pool(pool_dir, pool_truth, train_x, train_y, pool_idx)
    count = len(test_x) if split.test_limit is None else min(split.test_limit, len(test_x))
    _write_test(test_dir, truth_csv, test_x, test_y, count)
    counts = {"train": len(train_idx), "val": len(val_idx), "test": count}
    if unlabeled:
        counts["unlabeled"] = len(pool_idx)
    manifest.write_text(json.dumps({"settings": settings, "counts": counts, "source": origin}, indent=2) + "\n")
    return FashionMNISTExport(root, train_dir, val_dir, test_dir, truth_csv, list(FASHION_MNIST_CLASSES), counts,
                              origin, False, *pool_paths)


def describe(export: FashionMNISTExport) -> str:
    """Where each part of an export is, as a few lines for the console."""
    verb = "reused" if export.reused else "wrote"
    return "\n".join([
        f"{verb} Fashion-MNIST ({export.source}) in {export.root}:",
        f"  training images    {export.counts['train']:>6}  {export.train_dir}/<class>/",
        f"  validation images  {export.counts['val']:>6}  {export.val_dir}/<class>/",
        f"  test images        {export.counts['test']:>6}  {export.test_dir}/ (unlabeled)",
        f"  test answers               {export.truth_csv} (Id,Category)",
    ] + ([
        f"  unlabeled images   {export.counts['unlabeled']:>6}  {export.unlabeled_dir}/",
        f"  unlabeled answers          {export.unlabeled_truth} (Id,Category; for pseudo-label accuracy)",
    ] if export.unlabeled_dir is not None else []))



@dataclass
class MosaicExport:
    """Where a multi-label Fashion-MNIST export put its files."""

    root: Path
    manifest: Path
    image_dir: Path
    test_dir: Path
    truth_csv: Path
    classes: list[str]
    counts: dict[str, int]
    source: str


def _mosaics(images: np.ndarray, labels: np.ndarray, count: int,
             rng: np.random.Generator) -> list[tuple[np.ndarray, list[str]]]:
    """`count` 56x56 mosaics: 1-4 garments (uniformly many) in random cells of a 2x2 grid, the rest black."""
    out = []
    for _ in range(count):
        garments = int(rng.integers(1, 5))
        canvas = np.zeros((56, 56), dtype=np.uint8)
        cells = rng.permutation(4)[:garments]
        picks = rng.integers(0, len(images), size=garments)
        for cell, pick in zip(cells, picks):
            y, x = divmod(int(cell), 2)
            canvas[28 * y: 28 * y + 28, 28 * x: 28 * x + 28] = images[pick]
        present = sorted({int(labels[p]) for p in picks})
        out.append((canvas, [FASHION_MNIST_CLASSES[k] for k in present]))
    return out


def export_fashion_mnist_mosaics(
    out_dir: Union[str, Path],
    train: int = 600,
    test: int = 400,
    seed: int = 0,
    source: Optional[Union[str, Path]] = None,
) -> MosaicExport:
    """A multi-label set from Fashion-MNIST: 2x2 mosaics of one to four garments, labelled with the classes present.

    Labelled mosaics (from the 60 000 training images) go to ``images/`` with ``labels.csv``
    (``image_name,tags``, tags space-separated: Kaggle's Planet format); test mosaics (from the 10 000
    test images, so no garment image is shared) to ``test/`` with the answers in ``test_truth.csv`` (``Id,Tags``).
    """
    if train < 10 or test < 1:
        raise FinetuneError("--train must be at least 10 and --test at least 1")
    root = Path(out_dir).expanduser()
    if root.exists() and any(root.iterdir()):
        raise FinetuneError(f"{root} already exists and is not empty; choose another --out or delete it")
    (train_x, train_y, test_x, test_y), origin = load_fashion_mnist(source)
    rng = np.random.default_rng(seed)
    image_dir, test_dir = root / "images", root / "test"
    manifest, truth_csv = root / "labels.csv", root / "test_truth.csv"
    for folder, csv_path, header, mosaics in (
        (image_dir, manifest, ["image_name", "tags"], _mosaics(train_x, train_y, train, rng)),
        (test_dir, truth_csv, ["Id", "Tags"], _mosaics(test_x, test_y, test, rng)),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for i, (canvas, names) in enumerate(mosaics):
                image_id = f"{i + 1:05d}"
                Image.fromarray(canvas).save(folder / f"{image_id}.png")
                writer.writerow([image_id, " ".join(names)])
    return MosaicExport(root, manifest, image_dir, test_dir, truth_csv, list(FASHION_MNIST_CLASSES),
                        {"train": train, "test": test}, origin)


def describe_mosaics(export: MosaicExport) -> str:
    """Where each part of a multi-label export is, as a few lines for the console."""
    return "\n".join([
        f"wrote multi-label Fashion-MNIST mosaics ({export.source}) in {export.root}:",
        f"  labelled mosaics   {export.counts['train']:>6}  {export.image_dir}/, labels in {export.manifest.name}",
        f"  test mosaics       {export.counts['test']:>6}  {export.test_dir}/ (unlabeled)",
        f"  test answers               {export.truth_csv} (Id,Tags)",
    ])
