"""WebDataset tar shards: the format, the index, and writing them from any layout the toolkit reads.

A shard set is `{split}-000000.tar, {split}-000001.tar, ...` plus `{split}-index.json` (classes, the task, the
number of samples and of each class, each shard's sample count and size), so a run knows its classes and epoch
length without opening a shard, and `{split}-members.npy` (with `-member-names.npy`, `-member-labels.npy`),
where each sample's image sits in its shard. Each sample
is the image's bytes as they were (`{key}.jpg`, no re-encode) and, when labelled, `{key}.cls` (the class index) or
`{key}.json` (`{"labels": [indices]}`, several per image); the key is the image's path relative to its data folder
without the suffix, so webdataset, timm's `wds` datasets and `tar tf` read the same samples. A dot in a name is
written as `%2E` (webdataset splits a member's name at its first dot). Writing: finetune.data.shard_writer;
reading: finetune.data.shard_members.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from finetune.errors import FinetuneError

__all__ = ["INDEX_SUFFIX", "MEMBERS_SUFFIX", "FORMAT", "UNLABELLED", "ShardEntry", "ShardIndex", "escape_key",
           "unescape_key", "load_index", "is_shard_spec"]

FORMAT = "finetune-shards"
VERSION = 1
INDEX_SUFFIX = "-index.json"
MEMBERS_SUFFIX = "-members.npy"  # every sample's name, data offset, size and labels: no tar header read to train
UNLABELLED = "none"  # the index's task for images without labels
Target = Union[int, tuple[int, ...], None]


def escape_key(name: str) -> str:
    """A sample key webdataset splits correctly: `%` and `.` escaped (its extension starts at the first dot)."""
    return name.replace("%", "%25").replace(".", "%2E")


def unescape_key(key: str) -> str:
    """The relative name a key was made from (escape_key's inverse)."""
    return key.replace("%2E", ".").replace("%25", "%")


# ---- the index --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardEntry:
    """One shard: its file name (beside the index) and how many samples it holds."""

    name: str
    count: int
    size: int = -1  # bytes, to tell a truncated copy at start-up (-1: not recorded)
    first_row: int = -1  # its first sample's row in the set's member table (-1: not in it; its headers are read)


@dataclass
class ShardIndex:
    """What a shard set holds, from `{split}-index.json`: enough to train without opening a shard."""

    path: Path  # the index file
    split: str
    task: str  # the data.task it was written for: single | multilabel | none (unlabeled images)
    classes: list[str]
    shards: list[ShardEntry]
    class_counts: list[int]
    source: str = ""
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of what was left out when writing

    @property
    def labelled(self) -> bool:
        """Whether its samples carry labels (a test set's do not)."""
        return self.task != UNLABELLED

    @property
    def count(self) -> int:
        """Samples in the set."""
        return sum(entry.count for entry in self.shards)

    @property
    def folder(self) -> Path:
        """The folder holding the shards."""
        return self.path.parent

    def shard_paths(self) -> list[Path]:
        """The shards' paths, in order."""
        return [self.folder / entry.name for entry in self.shards]

    def to_json(self) -> dict:
        """The index file's contents."""
        return {"format": FORMAT, "version": VERSION, "split": self.split, "task": self.task,
                "classes": self.classes, "count": self.count, "class_counts": self.class_counts,
                "shards": [{"name": e.name, "count": e.count, "bytes": e.size, "first_row": e.first_row}
                           for e in self.shards], "source": self.source,
                "skipped": self.skipped}


def is_shard_spec(spec: Union[str, Path]) -> bool:
    """True for what names a shard set: an index file, a .tar shard or a brace pattern of them."""
    text = str(spec)
    return text.endswith(INDEX_SUFFIX) or text.endswith(".tar") or ("{" in text and ".tar" in text)


def load_index(spec: Union[str, Path], base: Optional[Path] = None) -> ShardIndex:
    """The shard set `spec` names: an index file (`train-index.json`), or shards (`train-{000000..000127}.tar`,
    one `.tar`) beside their index; relative to `base`. A pattern may name part of the set (those shards only)."""
    text = str(spec)
    if "://" in text or text.startswith("pipe:"):
        raise FinetuneError(f"{text}: shards are read from local files (or a mounted shared disk) here; streaming "
                            "from URLs or pipe: commands is not supported yet. Copy the shards and their index to "
                            "a local folder and name that")
    path = Path(text).expanduser()
    path = path if path.is_absolute() or base is None else Path(base).expanduser() / path
    if text.endswith(INDEX_SUFFIX):
        return _read_index(path)
    names = _expand(path.name)
    prefix = names[0].rsplit("-", 1)[0]
    index = _read_index(path.parent / f"{prefix}{INDEX_SUFFIX}")
    known = {entry.name: entry for entry in index.shards}
    missing = [name for name in names if name not in known]
    if missing:
        raise FinetuneError(f"{path.parent / prefix}{INDEX_SUFFIX} does not list {missing[:3]} ({len(missing)} of "
                            f"the {len(names)} shards {text} names); name shards of that set, or write them again "
                            "with finetune datasets shard")
    index.shards = [known[name] for name in names]
    index.class_counts = []  # only known for the whole set
    return index


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _read_index(path: Path) -> ShardIndex:
    if not path.is_file():
        raise FinetuneError(f"shard index {path} not found; a shard set is written with its index by: finetune "
                            f"datasets shard DATA --out {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        shards = [ShardEntry(str(s["name"]), int(s["count"]), int(s.get("bytes", -1)), int(s.get("first_row", -1)))
                  for s in data["shards"]]
        index = ShardIndex(path, str(data["split"]), str(data["task"]), [str(c) for c in data["classes"]], shards,
                           [int(c) for c in data.get("class_counts", [])], str(data.get("source", "")),
                           list(data.get("skipped", [])))
    except (ValueError, KeyError, TypeError) as err:
        raise FinetuneError(f"{path} is not a shard index written by finetune datasets shard ({err}); write the "
                            "shards again") from None
    for entry in index.shards:
        shard = index.folder / entry.name
        if not shard.is_file():
            raise FinetuneError(f"shard {shard} listed in {path} is missing; copy it back or write the shard set "
                                "again with finetune datasets shard")
        if entry.size >= 0 and shard.stat().st_size != entry.size:
            raise FinetuneError(f"shard {shard} holds {shard.stat().st_size} bytes where {path} says {entry.size}: it "
                                "is truncated or was replaced; copy it again or write the shard set again")
    return index
