"""`finetune datasets shard`: any data layout the toolkit reads, written as WebDataset tar shards with an index."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from finetune.config.recipe import Recipe, resolve_recipe
from finetune.data.images import list_images
from finetune.data.prepare import prepare
from finetune.data.shard_writer import write_shard_set
from finetune.data.shards import INDEX_SUFFIX, UNLABELLED, ShardIndex
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.tasks import task_of
from finetune.workflows.api import Log, test_image_paths

__all__ = ["shard_dataset"]


def _named(paths: Sequence[Path], root: Path) -> list[str]:
    """Each path's name in the shards: relative to the data folder (else to the set's common folder), so that keys
    are unique and a sample's stem is its file's."""
    resolved = [path.resolve() for path in paths]
    if all(path.is_relative_to(root) for path in resolved):
        base = root
    else:
        base = Path(os.path.commonpath([str(path.parent) for path in resolved])) if resolved else root
    return [path.relative_to(base).as_posix() for path in resolved]


def _items(samples: Sequence[Sample], root: Path) -> list[tuple[Path, str, object]]:
    names = _named([s.path for s in samples], root)
    return [(s.path, name, s.target) for s, name in zip(samples, names)]


def _plan(out: Path, classes: list[str], split: str, task: str, source: str,
          skipped: Optional[list[dict]] = None) -> ShardIndex:
    """What a shard set will be, before its shards are written."""
    return ShardIndex(out / f"{split}{INDEX_SUFFIX}", split, task, classes, [], [], source, skipped or [])


def _write_test(folder: Optional[Path], plan: Callable[..., ShardIndex], shard_size: int,
                log: Log) -> Optional[ShardIndex]:
    """The test folder's images, every one (an unreadable image still gets its prediction row), as the test set."""
    if folder is None:
        return None
    if not list_images(folder, recursive=True):
        log(f"{folder} holds no images: no test shards written")
        return None
    paths = test_image_paths(folder, log)
    items = [(path, name, None) for path, name in zip(paths, _named(paths, folder))]
    return write_shard_set(items, plan("test", UNLABELLED, str(folder)), shard_size, log)


def shard_dataset(
    data: Union[str, Path],
    out: Union[str, Path],
    recipe: Union[Recipe, str, Path, None] = None,
    shard_size: int = 1000,
    overrides: Optional[list[str]] = None,
    log: Log = print,
) -> list[ShardIndex]:
    """Write a labelled data folder as WebDataset shards: train, val and test sets, each with its index.

    The folder is read as training reads it (class folders, labels in file names, a CSV manifest, several labels
    per image; the recipe's data section says which), files that are not images are left out and listed in the
    train index, and without a validation folder the recipe's split is held out and written as the val set. Test
    images are written whole (an unreadable one still gets its prediction row). Image bytes are kept as they are.

    Args:
        data: the data folder (train/, val/, test/ or a manifest, as for train).
        out: folder for the shards and their index files (`train-000000.tar`, `train-index.json`, ...).
        recipe: a recipe whose data section describes the folder (default: the built-in defaults).
        shard_size: images per shard (1 000 images of 100 kB are a 100 MB shard).
        overrides: recipe settings KEY=VALUE, e.g. data.layout=csv data.csv=labels.csv.
    """
    if shard_size < 1:
        raise FinetuneError(f"--shard-size must be at least 1, got {shard_size}")
    resolved = resolve_recipe(recipe, overrides, data)
    if resolved.data.layout == "shards":
        raise FinetuneError("the data is already shards (data.layout: shards); give the image folder it came from")
    root, target = Path(resolved.data.root or ".").resolve(), Path(out).expanduser().resolve()
    if target.is_relative_to(root) or root.is_relative_to(target):
        # Inside the data, the shard folder would be read as data the next time (a class of no images).
        raise FinetuneError(f"--out {target} and the data folder {root} overlap; write the shards to a folder outside "
                            "the data")
    task = task_of(resolved)
    prepared = prepare(resolved, task, log)
    source = f"{root} ({resolved.data.layout} layout)"
    skipped = [{"path": str(item.path), "reason": item.reason} for item in prepared.skipped]
    plan = partial(_plan, target, prepared.classes)
    indexes = [write_shard_set(_items(prepared.train, root), plan("train", resolved.data.task, source, skipped),
                               shard_size, log),
               write_shard_set(_items(prepared.val, root), plan("val", resolved.data.task,
                                                                 f"{source}, validation: {prepared.val_source}"),
                               shard_size, log)]
    test = _write_test(prepared.test_dir, plan, shard_size, log)
    indexes += [test] if test is not None else []
    if skipped:
        log(f"{len(skipped)} file(s) were not images and were left out; listed in {indexes[0].path} ('skipped')")
    return indexes


def shard_command(data: str, out: str, recipe: Optional[str] = None, shard_size: int = 1000,
                  overrides: Optional[list[str]] = None) -> str:
    """Write a labelled data folder as WebDataset tar shards (train, val and test sets, each with its index).

    Args:
        data: the data folder, read as `finetune train` reads it (the recipe's data section says how).
        out: folder for the shards and their index files.
        recipe: a recipe whose data section describes the folder (default: the built-in defaults).
        shard_size: images per shard.
        overrides: recipe settings KEY=VALUE, e.g. data.layout=csv data.csv=labels.csv.
    """
    indexes = shard_dataset(data, out, recipe, shard_size, overrides)
    lines = [f"train on them with: finetune train RECIPE --data {indexes[0].folder} --set data.layout=shards"]
    if len(indexes) > 2:
        lines.append(f"predict with: finetune predict CKPT --images {indexes[2].path}")
    return "\n".join(lines)
