"""Dataset sources: class folders, labels in file names (HW03), CSV manifests → labelled samples."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from finetune.data.images import SkippedImage, file_identity, list_images, scan_images
from finetune.data.samples import Sample
from finetune.data.shard_members import ShardSamples
from finetune.data.shards import INDEX_SUFFIX, load_index
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig

__all__ = [
    "find_child",
    "resolve_manifest_path",
    "Sample",
    "one_sample_per_file",
    "ManifestImages",
    "LabelledSet",
    "DatasetSplits",
    "discover",
    "discover_shards",
    "shard_set_samples",
    "read_labelled_folder",
    "read_manifest",
    "sort_class_names",
    "single_image_subfolder",
    "LABELED_NAMES",
    "UNLABELED_NAMES",
]

TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "validation", "valid")
TEST_NAMES = ("test", "testing")
LABELED_NAMES = ("labeled", "labelled")  # HW03 2021: training/labeled/<class>/ beside training/unlabeled/
UNLABELED_NAMES = ("unlabeled", "unlabelled")


# A filter on samples: (kept, skipped with reasons), e.g. finetune.data.prepare.readable.
Keep = Callable[[Sequence[Sample]], tuple[list[Sample], list[SkippedImage]]]


@dataclass
class LabelledSet:
    """Images with class names before they are mapped to indices."""

    items: list[tuple[Path, str]]
    skipped: list[SkippedImage] = field(default_factory=list)
    identities: Optional[list[tuple]] = None  # each item's file_identity, where it was read with the listing


@dataclass
class DatasetSplits:
    """What `discover` found: class names, train/val samples, the test folder, skipped files."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    val_source: str  # "folder" or "split"
    test_dir: Optional[Path]
    skipped: list[SkippedImage]
    unlabeled_dir: Optional[Path] = None  # images without labels (HW03 2021: training/unlabeled/)
    notes: list[str] = field(default_factory=list)  # how the layout was read, for the log


def sort_class_names(names: set[str]) -> list[str]:
    """Numeric order when every name is an integer (HW03: 0..10), else alphabetical."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def find_child(root: Path, wanted: Optional[str], defaults: tuple[str, ...]) -> Optional[Path]:
    """The sub-folder a recipe names (`wanted`), or with "auto" the first of `defaults` present; None for none."""
    if wanted is None:
        return None
    if wanted != "auto":
        path = root / wanted
        if not path.is_dir():
            raise FinetuneError(f"folder {path} not found (set in the recipe's data section)")
        return path
    for name in defaults:
        for candidate in (root / name, root / name.capitalize()):
            if candidate.is_dir():
                return candidate
    return None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _real_class_dirs(folder: Path) -> tuple[list[Path], list[SkippedImage]]:
    """Class folders, less symlinks that would read images a second time (skipped, with the reason).

    `train/loopy -> .` would otherwise be a class holding every image again.
    """
    tree = folder.resolve()
    kept, skipped, seen = [], [], set()
    for class_dir in _class_dirs(folder):
        target = class_dir.resolve()
        if target in seen:
            skipped.append(SkippedImage(class_dir, f"class folder links to {target}, a folder already read: skipped"))
        elif target != tree / class_dir.name and (target.is_relative_to(tree) or tree.is_relative_to(target)):
            skipped.append(SkippedImage(class_dir, f"class folder links to {target}, inside the data it belongs "
                                                   "to: skipped (it would repeat those images as a fake class)"))
        else:
            kept.append(class_dir)
            seen.add(target)
    return kept, skipped


def _identities(found: LabelledSet) -> list[tuple]:
    """Each item's file identity: as read with the folder listing, else one stat per file."""
    return found.identities if found.identities is not None else [file_identity(p) for p, _ in found.items]


def one_sample_per_file(found: LabelledSet, where: Path) -> LabelledSet:
    """One file (symlinks and hard links alike) is one sample: repeats are dropped and listed, two labels are an error.
    The result carries each kept item's file identity."""
    first: dict[tuple, tuple[Path, str]] = {}
    items, kept, skipped = [], [], list(found.skipped)
    conflicts: dict[Path, set[str]] = {}
    for (path, name), key in zip(found.items, _identities(found)):
        if key not in first:
            first[key] = (path, name)
            items.append((path, name))
            kept.append(key)
        elif first[key][1] == name:
            skipped.append(SkippedImage(path, f"same image as {first[key][0]} with the same label: used once"))
        else:
            conflicts.setdefault(first[key][0], {first[key][1]}).add(name)
    if conflicts:
        examples = "; ".join(f"{p} ({', '.join(sorted(labels))})" for p, labels in list(conflicts.items())[:5])
        raise FinetuneError(
            f"{len(conflicts)} image(s) in {where} have two or more labels, e.g. {examples}; a file is one sample "
            "with one label: remove the wrong rows or copies"
        )
    return LabelledSet(items, skipped, kept)


def _only_split_names(class_dirs: Sequence[Path]) -> bool:
    """True when every sub-folder is named labeled/unlabeled: a semi-supervised tree, not classes."""
    names = {p.name.lower() for p in class_dirs}
    return bool(names) and names <= set(LABELED_NAMES + UNLABELED_NAMES)


def _detect_layout(folder: Path) -> str:
    if _class_dirs(folder):
        return "folder"
    if list_images(folder):
        return "filename"
    raise FinetuneError(
        f"no images found in {folder}: expected class sub-folders (train/<class>/*.jpg) "
        "or images named like 3_120.jpg"
    )


def read_labelled_folder(folder: Path, layout: str, label_regex: str) -> LabelledSet:
    """Read (path, class name) pairs from a class-per-subfolder or label-in-filename folder.

    With `layout: auto`, sub-folders named only labeled/unlabeled are refused as classes: that is the
    semi-supervised layout (`data.train: training/labeled`, `data.unlabeled: training/unlabeled`).
    """
    detected = layout == "auto"
    if detected:
        layout = _detect_layout(folder)
    if layout == "folder":
        items: list[tuple[Path, str]] = []
        identities: list[tuple] = []
        class_dirs, skipped_dirs = _real_class_dirs(folder)
        if detected and _only_split_names(class_dirs):
            names = ", ".join(p.name for p in class_dirs)
            raise FinetuneError(
                f"{folder} holds only the sub-folders {names}: that is a labeled/unlabeled split, not classes. "
                f"Point data.train at the class folders (e.g. --set data.train={folder.name}/labeled) and "
                f"data.unlabeled at the rest; if they really are your classes, set data.layout: folder"
            )
        if not class_dirs:
            raise FinetuneError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
        for class_dir in class_dirs:
            images, found_identities = scan_images(class_dir, recursive=True)
            if not images:
                raise FinetuneError(
                    f"class '{class_dir.name}' has no images in {class_dir}; add images or remove the folder"
                )
            items.extend((path, class_dir.name) for path in images)
            identities += found_identities
        return one_sample_per_file(LabelledSet(items, skipped_dirs, identities), folder)
    try:
        pattern = re.compile(label_regex)
    except re.error as err:
        raise FinetuneError(f"data.label_regex {label_regex!r} is not a valid regex: {err}") from None
    if pattern.groups < 1:
        raise FinetuneError(f"data.label_regex {label_regex!r} needs one group that captures the label")
    items, skipped, identities = [], [], []
    for path, identity in zip(*scan_images(folder)):
        match = pattern.search(path.name)
        if match:
            items.append((path, match.group(1)))
            identities.append(identity)
        else:
            skipped.append(SkippedImage(path, f"file name does not match label_regex {label_regex!r}"))
    if not items:
        raise FinetuneError(
            f"no file in {folder} matches data.label_regex {label_regex!r} (e.g. '3_120.jpg' → class 3)"
        )
    return one_sample_per_file(LabelledSet(items, skipped, identities), folder)


def resolve_manifest_path(value: str, image_dir: Path, by_stem: dict[str, Path]) -> Optional[Path]:
    """The image a manifest cell names: a path under `image_dir`, else a file stem (id); None when neither."""
    candidate = image_dir / value
    if value and not candidate.is_dir() and (candidate.exists() or candidate.is_symlink()):
        return candidate  # a FIFO or a dangling link too: it is then listed with its reason, not as missing
    return by_stem.get(value)


def manifest_paths(cfg: DataConfig, root: Path) -> tuple[Path, Path]:
    """The recipe's CSV manifest and the folder its ids are relative to (both under `root` unless absolute)."""
    manifest = Path(cfg.csv or "").expanduser()
    if not manifest.is_absolute():
        manifest = root / manifest
    if not manifest.is_file():
        raise FinetuneError(f"CSV manifest not found: {manifest}")
    image_dir = Path(cfg.csv_image_dir).expanduser() if cfg.csv_image_dir else manifest.parent
    if not image_dir.is_absolute():
        image_dir = root / image_dir
    return manifest, image_dir


class ManifestImages:
    """The images a manifest's cells may name, for one look-up per row: the image folder scanned once (paths and
    file identities; stems only if a cell is an id), instead of stats per row. A cell the scan did not see (a file
    behind a linked folder, without an image extension, or spelled with '..') is looked up on disk as before."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self.base = os.path.normpath(str(image_dir))
        paths, identities = scan_images(image_dir, recursive=True) if image_dir.is_dir() else ([], [])
        self.paths = paths
        self.by_path = {str(path): (path, identity) for path, identity in zip(paths, identities)}
        self._by_stem: Optional[dict[str, Path]] = None

    def find(self, value: str) -> Optional[tuple[Path, tuple]]:
        """The image `value` names (a path under the image folder, else a file stem) and its identity, or None."""
        if value:
            hit = self.by_path.get(os.path.normpath(os.path.join(self.base, value)))
            if hit is not None:
                return hit
        if self._by_stem is None:
            self._by_stem = {path.stem: path for path in self.paths}
        path = resolve_manifest_path(value, self.image_dir, self._by_stem)
        return None if path is None else (path, file_identity(path))


def read_manifest(cfg: DataConfig, root: Path) -> LabelledSet:
    """Read a CSV manifest: a path (or Kaggle id) column and a label column; rows are read as they stream."""
    manifest, image_dir = manifest_paths(cfg, root)
    images = ManifestImages(image_dir)
    items, skipped, identities = [], [], []
    with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of the header
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if len(columns) < 2:
            raise FinetuneError(f"{manifest} needs at least two columns (path or id, label); found {columns}")
        id_col = cfg.csv_id_column or columns[0]
        label_col = cfg.csv_label_column or columns[1]
        for col in (id_col, label_col):
            if col not in columns:
                raise FinetuneError(f"column '{col}' not in {manifest}; columns are {', '.join(columns)}")
        for row in reader:
            value, label = (row[id_col] or "").strip(), (row[label_col] or "").strip()
            hit = images.find(value)
            if hit is None:
                skipped.append(SkippedImage(image_dir / value, "listed in the manifest but no such image file"))
            elif not label:
                skipped.append(SkippedImage(hit[0], "empty label in the manifest"))
            else:
                items.append((hit[0], label))
                identities.append(hit[1])
    if not items:
        raise FinetuneError(f"no manifest row of {manifest} points to an image in {image_dir}")
    return one_sample_per_file(LabelledSet(items, skipped, identities), manifest)


def _to_samples(labelled: LabelledSet, classes: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, name in labelled.items if name not in index})
    if unknown:
        raise FinetuneError(
            f"validation classes {unknown} do not appear in the training data; classes are {classes}"
        )
    return [Sample(path, index[name]) for path, name in labelled.items]


def _stratified_split(samples: list[Sample], fraction: float, seed: int,
                      classes: Sequence[str]) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split

    labels = [s.target for s in samples]
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    single = [classes[label] for label, count in sorted(counts.items()) if count < 2]
    if single:
        raise FinetuneError(
            f"class(es) {', '.join(single[:10])} have a single image, too few to hold one out for validation; "
            "add images, give a validation folder, or remove the class"
        )
    n_val = max(len(counts), round(len(samples) * fraction))
    if len(samples) - n_val < len(counts):
        raise FinetuneError(f"only {len(samples)} images for {len(counts)} classes: too few to split; add images")
    train, val = train_test_split(samples, test_size=n_val, stratify=labels, random_state=seed)
    return list(train), list(val)


def _check_disjoint(train_set: LabelledSet, val_set: LabelledSet) -> None:
    val_files = set(_identities(val_set))
    both = {p for (p, _), key in zip(train_set.items, _identities(train_set)) if key in val_files}
    if both:
        raise FinetuneError(
            f"{len(both)} image(s) are in both the training and the validation data (e.g. {sorted(both)[0]}); "
            "that inflates validation accuracy: keep each image in one of them"
        )


def discover(cfg: DataConfig, seed: int = 0, keep: Optional[Keep] = None) -> DatasetSplits:
    """Find the training/validation/test images that `cfg` describes.

    `keep` (e.g. the decode check) filters the samples before the validation split, so the split
    holds the share of images that will really be used; what it drops joins `skipped`.
    """
    if not cfg.root:
        raise FinetuneError("no dataset folder: pass --data DIR or set data.root in the recipe")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FinetuneError(f"dataset folder not found: {root}")
    notes: list[str] = []
    test_dir = _test_folder(find_child(root, cfg.test, TEST_NAMES), cfg.test == "auto", notes)
    unlabeled_dir = None
    if cfg.layout == "csv":
        train_set, val_set = read_manifest(cfg, root), None
    else:
        train_dir = find_child(root, cfg.train, TRAIN_NAMES) or root
        train_dir, unlabeled_dir = _semi_supervised_split(root, train_dir, cfg, notes)
        val_dir = find_child(root, cfg.val, VAL_NAMES)
        train_set = read_labelled_folder(train_dir, cfg.layout, cfg.label_regex)
        val_set = read_labelled_folder(val_dir, cfg.layout, cfg.label_regex) if val_dir else None
    if cfg.layout == "csv" and cfg.unlabeled not in (None, "auto"):
        unlabeled_dir = _unlabeled_folder(root / cfg.unlabeled)
    classes = sort_class_names({name for _, name in train_set.items})
    if len(classes) < 2:
        raise FinetuneError(f"found only one class ({classes[0]}) in {root}; a classifier needs at least two")
    skipped = list(train_set.skipped) + (list(val_set.skipped) if val_set else [])
    keep = keep or (lambda samples: (list(samples), []))
    train, dropped = keep(_to_samples(train_set, classes))
    skipped += dropped
    if val_set is not None:
        _check_disjoint(train_set, val_set)
        val, dropped = keep(_to_samples(val_set, classes))
        return DatasetSplits(classes, train, val, "folder", test_dir, skipped + dropped, unlabeled_dir, notes)
    train, val = _stratified_split(train, cfg.val_fraction, seed, classes)
    return DatasetSplits(classes, train, val, "split", test_dir, skipped, unlabeled_dir, notes)


def _shard_spec(value: Optional[str], split: str) -> Optional[str]:
    """What data.train / data.val / data.test name with data.layout: shards ("auto": `{split}-index.json`)."""
    return f"{split}{INDEX_SUFFIX}" if value == "auto" else value


def discover_shards(cfg: DataConfig) -> DatasetSplits:
    """The training and validation shard sets (data.layout: shards) without opening a training shard: classes,
    counts and the epoch's length come from the index; validation samples are listed from the member table."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is not None and not root.is_dir():
        raise FinetuneError(f"dataset folder not found: {root}")
    train = load_index(_shard_spec(cfg.train, "train") or "train" + INDEX_SUFFIX, root)
    if train.task != cfg.task:
        raise FinetuneError(f"{train.path} holds samples written for data.task {train.task!r}, but the recipe says "
                            f"{cfg.task!r}; set data.task: {train.task} (or write the shards again)")
    if len(train.classes) < 2:
        raise FinetuneError(f"{train.path} lists {len(train.classes)} class(es); a classifier needs at least two")
    val_spec = _shard_spec(cfg.val, "val")
    if val_spec is None:
        raise FinetuneError("data.layout is 'shards' but data.val is null: shards hold a fixed validation set "
                            "(finetune datasets shard writes val-index.json); name it in data.val")
    val_samples, skipped = shard_set_samples(val_spec, train.classes, root)
    notes = [f"shards: {train.count} training images in {len(train.shards)} shard(s) ({train.path}), "
             f"{len(val_samples)} validation images"]
    skipped = [SkippedImage(Path(item["path"]), item["reason"]) for item in train.skipped] + skipped
    return DatasetSplits(list(train.classes), ShardSamples(train, len(train.classes)), val_samples,  # type: ignore
                         "shards", None, skipped, None, notes)


def shard_set_samples(spec: Union[str, Path], classes: Sequence[str],
                      base: Optional[Path] = None) -> tuple[list[Sample], list[SkippedImage]]:
    """Every sample of a shard set, labelled by `classes` (a checkpoint's, or the training set's), and the samples
    that cannot be used (no image, no or unknown label), listed with the reason."""
    index = load_index(spec, base)
    if index.labelled:
        unknown = [name for name in index.classes if name not in set(classes)]
        if unknown:
            raise FinetuneError(f"{index.path} has classes {unknown[:10]} that the model does not know; it was "
                                f"trained on {len(classes)}: {', '.join(list(classes)[:20])}. Use the matching "
                                "checkpoint or shards")
    position = {name: classes.index(name) for name in index.classes if name in classes}
    remap = [position.get(name, -1) for name in index.classes]
    lazy = ShardSamples(index, len(index.classes))
    problems = dict(lazy.problems())
    samples, skipped = [], [SkippedImage(path, reason) for path, reason in problems.items()]
    for sample in lazy:
        if sample.path in problems:
            continue
        target = sample.target
        if isinstance(target, tuple):
            target = tuple(sorted(remap[k] for k in target))
        elif target is not None:
            target = remap[target]
        samples.append(Sample(sample.path, target))
    return samples, skipped


def _unlabeled_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FinetuneError(f"unlabeled folder {path} not found (data.unlabeled in the recipe)")
    if not list_images(path, recursive=True):
        raise FinetuneError(f"the unlabeled folder {path} holds no images (data.unlabeled in the recipe)")
    return path


def _named_child(folder: Path, names: tuple[str, ...]) -> Optional[Path]:
    by_name = {p.name.lower(): p for p in _class_dirs(folder)} if folder.is_dir() else {}
    return next((by_name[n] for n in names if n in by_name), None)


def _semi_supervised_split(root: Path, train_dir: Path, cfg: DataConfig,
                           notes: list[str]) -> tuple[Path, Optional[Path]]:
    """(labelled training folder, unlabeled folder): finds HW03 2021's training/labeled + training/unlabeled."""
    labeled = _named_child(train_dir, LABELED_NAMES) if cfg.train == "auto" else None
    unlabeled = None
    if cfg.unlabeled not in (None, "auto"):
        unlabeled = _unlabeled_folder(root / cfg.unlabeled)
    elif cfg.unlabeled == "auto":
        # Beside labeled/ (HW03 2021), or at the top when the training images are elsewhere; never a class
        # folder of a plain training tree (a class may be called "unlabeled").
        found = _named_child(train_dir, UNLABELED_NAMES) if labeled is not None else (
            _named_child(root, UNLABELED_NAMES) if train_dir != root else None)
        unlabeled = found if found is not None and list_images(found, recursive=True) else None
    if labeled is not None:
        notes.append(f"semi-supervised layout: labelled training images in {labeled.relative_to(root)}/<class>/")
        train_dir = labeled
    if unlabeled is not None:
        count = len(list_images(unlabeled, recursive=True))
        notes.append(f"unlabeled images: {count} in {unlabeled} (used only by a recipe's semi: section or "
                     "`finetune pseudo-label`)")
    return train_dir, unlabeled


def single_image_subfolder(folder: Path) -> Optional[Path]:
    """The one sub-folder holding `folder`'s images when it has no images itself (HW03 2021: testing/00/)."""
    if not folder.is_dir() or list_images(folder):
        return None
    subs = _class_dirs(folder)
    return subs[0] if len(subs) == 1 and list_images(subs[0]) else None


def _test_folder(test_dir: Optional[Path], auto: bool, notes: list[str]) -> Optional[Path]:
    """The folder that holds the test images: HW03 2021 keeps them in testing/00/, its one sub-folder."""
    inner = single_image_subfolder(test_dir) if test_dir is not None else None
    if inner is None:
        return test_dir
    if auto:
        notes.append(f"test images in {inner} (the one sub-folder of {test_dir.name}/)")
    return inner
