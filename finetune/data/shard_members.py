"""Reading shard sets: where each sample sits in its shard, member paths, and the lazy sequence of samples.

Reading is random access, so the training order, samplers, torchrun's split, exact resume, k-fold and the caches
work as they do for files: `ShardSamples[i]` is the i-th sample in the order the shards were written (the folder's
order), and its image is one `pread` at an offset the member table (`{split}-members.npy` and two more NumPy
files, memory-mapped at start-up) gives. A shard the member table does not cover (added by hand, written by
another tool) has its tar headers read the first time one of its samples is wanted. Samples are addressed as *member paths*,
`.../train-000003.tar/cat/001.jpg`, which `finetune.data.images` opens like files: a sample's Id is its original
file stem, and what cannot be read is listed with that path.
"""

from __future__ import annotations

import json
import os
import tarfile
from bisect import bisect_right
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from finetune.data.samples import Sample
from finetune.data.shards import MEMBERS_SUFFIX, ShardIndex, Target, unescape_key
from finetune.errors import FinetuneError

__all__ = ["MemberTable", "ShardSamples", "read_table", "scan_table", "save_members", "member_of", "member_problem",
           "read_member", "member_identity"]

IMAGE_MEMBERS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm"})
# A sample's flags: what it lacks, and whether its labels came as a list (.json: several per image).
NO_IMAGE, NO_LABEL, BAD_LABEL, LABEL_LIST = 1, 2, 4, 8
PROBLEMS = {NO_IMAGE: "no image in the shard sample (no .jpg/.png/... member)",
            NO_LABEL: "no label in the shard sample (no .cls or .json member)",
            BAD_LABEL: "unreadable label in the shard sample"}
_ARRAYS = ("name_block", "name_starts", "name_ends", "offsets", "sizes", "label_block", "label_starts",
           "label_ends", "flags")


@dataclass
class MemberTable:
    """Samples as arrays (a row each): name bytes, the image's data offset and size in its shard, labels, flags.
    The blocks are shared; a shard's table is a view of the set's rows (no copy)."""

    name_block: np.ndarray  # uint8: every name, UTF-8, one after another
    name_starts: np.ndarray  # int64
    name_ends: np.ndarray
    offsets: np.ndarray  # int64; -1 where the sample has no image
    sizes: np.ndarray
    label_block: np.ndarray  # int32: every sample's class indices, as written
    label_starts: np.ndarray
    label_ends: np.ndarray
    flags: np.ndarray  # NO_IMAGE | NO_LABEL | BAD_LABEL | LABEL_LIST
    _rows: Optional[dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, start: int, stop: int) -> "MemberTable":
        """Rows start..stop as a table of their own (views)."""
        return MemberTable(self.name_block, *(getattr(self, name)[start:stop] for name in _ARRAYS[1:5]),
                           self.label_block, *(getattr(self, name)[start:stop] for name in _ARRAYS[6:]))

    def name(self, row: int) -> str:
        """The sample's name: its path relative to the data folder, with the image's suffix."""
        return bytes(self.name_block[self.name_starts[row]:self.name_ends[row]]).decode("utf-8")

    def labels(self, row: int) -> tuple[int, ...]:
        """The class indices the sample's label member holds."""
        return tuple(int(k) for k in self.label_block[self.label_starts[row]:self.label_ends[row]])

    def row(self, name: str) -> int:
        """The row of the sample called `name`; KeyError when there is none."""
        if self._rows is None:
            self._rows = {self.name(row): row for row in range(len(self))}
        return self._rows[name]


def _table(names: list[str], offsets: list[int], sizes: list[int], labels: list[tuple[int, ...]],
           flags: list[int]) -> MemberTable:
    encoded = [name.encode("utf-8") for name in names]
    name_ends = np.cumsum([len(item) for item in encoded], dtype=np.int64)
    label_ends = np.cumsum([len(item) for item in labels], dtype=np.int64)
    return MemberTable(np.frombuffer(b"".join(encoded), dtype=np.uint8), name_ends - [len(e) for e in encoded],
                       name_ends, np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                       np.asarray([k for item in labels for k in item], dtype=np.int32),
                       label_ends - [len(item) for item in labels], label_ends, np.asarray(flags, dtype=np.uint8))


def _label(members: dict[str, bytes]) -> tuple[tuple[int, ...], int]:
    """A sample's class indices and flags, from its label member."""
    try:
        if "cls" in members:
            return (int(members["cls"].decode("ascii").strip()),), 0
        if "json" in members:
            return tuple(int(k) for k in json.loads(members["json"])["labels"]), LABEL_LIST
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return (), BAD_LABEL
    return (), NO_LABEL


def _grouped(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample: consecutive members with one key, as webdataset groups them (the
    extension starts at the first dot of the file name)."""
    current, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        folder, _, leaf = info.name.rpartition("/")
        base, _, ext = leaf.partition(".")
        key = f"{folder}/{base}" if folder else base
        if current is not None and key != current:
            yield current, members
            members = {}
        current = key
        members[ext.lower()] = info
    if current is not None:
        yield current, members


_SCANNED: dict[str, MemberTable] = {}  # per process, keyed by path, size and modification time


def read_table(shard: Path) -> MemberTable:
    """A shard's member table from its tar headers (label members read, images not); cached in this process until
    the file changes."""
    try:
        info = os.stat(shard)
    except OSError as err:
        raise FinetuneError(f"shard {shard} cannot be read ({err.strerror}); copy it back or write the shard set "
                            "again with finetune datasets shard") from None
    key = f"{shard}|{info.st_size}|{info.st_mtime_ns}"
    if key not in _SCANNED:
        _SCANNED[key] = scan_table(shard)
    return _SCANNED[key]


def scan_table(shard: Path) -> MemberTable:
    names, offsets, sizes, labels, flags = [], [], [], [], []
    try:
        with tarfile.open(shard, "r:") as tar:
            for key, members in _grouped(tar):
                images = [ext for ext in members if ext in IMAGE_MEMBERS]
                small = {ext: tar.extractfile(members[ext]).read()  # type: ignore[union-attr]
                         for ext in ("cls", "json") if ext in members}
                found, flag = _label(small)
                image = members[images[0]] if images else None
                names.append(unescape_key(key) + (f".{images[0]}" if images else ""))
                offsets.append(image.offset_data if image else -1)
                sizes.append(image.size if image else -1)
                labels.append(found)
                flags.append(flag | (0 if images else NO_IMAGE))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise FinetuneError(f"shard {shard} cannot be read ({err}): it is truncated or damaged; copy it again or "
                            "write the shard set again with finetune datasets shard") from None
    return _table(names, offsets, sizes, labels, flags)


def _member_files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    """The member table's files: one row per sample (name start and end, image offset and size, label start and
    end, flags: int64), every name (UTF-8 bytes), every label (int32)."""
    return (folder / f"{split}{MEMBERS_SUFFIX}", folder / f"{split}-member-names.npy",
            folder / f"{split}-member-labels.npy")


def save_members(folder: Path, split: str, tables: list[MemberTable]) -> None:
    """A shard set's member table (rows in shard order), each file written whole or not at all."""
    names, labels = [t.name_block for t in tables], [t.label_block for t in tables]
    name_base = np.cumsum([0] + [len(block) for block in names[:-1]], dtype=np.int64)
    label_base = np.cumsum([0] + [len(block) for block in labels[:-1]], dtype=np.int64)
    columns = [[t.name_starts + b for t, b in zip(tables, name_base)],
               [t.name_ends + b for t, b in zip(tables, name_base)], [t.offsets for t in tables],
               [t.sizes for t in tables], [t.label_starts + b for t, b in zip(tables, label_base)],
               [t.label_ends + b for t, b in zip(tables, label_base)], [t.flags.astype(np.int64) for t in tables]]
    rows = np.stack([np.concatenate(c) if c else np.zeros(0, np.int64) for c in columns], axis=1)
    arrays = (rows, np.concatenate(names) if names else np.zeros(0, np.uint8),
              np.concatenate(labels) if labels else np.zeros(0, np.int32))
    for path, array in zip(_member_files(folder, split), arrays):
        temporary = path.with_name(f".{path.name}.partial")
        with temporary.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(temporary, path)


def _load_members(index: ShardIndex) -> dict[str, MemberTable]:
    """Each shard's table from the set's member files, memory-mapped: nothing is read until a sample is wanted,
    and forked loader workers share the pages. {} when the set has none."""
    files = _member_files(index.folder, index.split)
    if not all(path.is_file() for path in files):
        return {}
    try:
        rows, names, labels = (np.load(path, mmap_mode="r", allow_pickle=False) for path in files)
        whole = MemberTable(names, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], labels, rows[:, 4], rows[:, 5],
                            rows[:, 6])
    except (OSError, ValueError, IndexError) as err:
        raise FinetuneError(f"{files[0]} cannot be read ({err}); write the shard set again with finetune datasets "
                            "shard") from None
    tables = {}
    for entry in index.shards:
        if entry.first_row >= 0:
            if entry.first_row + entry.count > len(whole):
                raise FinetuneError(f"{files[0]} holds {len(whole)} samples, fewer than {index.path} says; write the "
                                    "shard set again")
            tables[entry.name] = whole.rows(entry.first_row, entry.first_row + entry.count)
    return tables


# ---- member paths -----------------------------------------------------------------------------------------------

def member_of(path: Path) -> Optional[tuple[Path, str]]:
    """(shard, member name) for a member path (`.../train-000003.tar/cat/001.jpg`), None for any other path."""
    text = str(path)
    cut = text.find(".tar" + os.sep)
    if cut < 0:
        return None
    shard = Path(text[:cut + 4])
    return (shard, text[cut + 5:]) if shard.is_file() else None


# Where the samples this process was handed last sit, with their problem: a loader worker reads an image right
# after its sample was made. Bounded: anything older is found again by name.
_RECENT: dict[str, tuple[str, int, int, Optional[str]]] = {}
_RECENT_LIMIT = 4096
_OWNERS: dict[str, MemberTable] = {}  # shard path -> its table, from the ShardSamples of this process
_FILES: dict[str, int] = {}  # open shard descriptors: pread needs no shared position, so forks may share them


def _locate(path: Path) -> tuple[str, int, int, Optional[str]]:
    """(shard, offset, size, problem) of a member path."""
    known = _RECENT.get(str(path))
    if known is not None:
        return known
    shard, name = member_of(path) or (path, "")
    table = _OWNERS.get(str(shard)) or read_table(shard)
    try:
        row = table.row(name)
    except KeyError:
        raise FinetuneError(f"cannot read image {path}: no such sample in shard {shard}") from None
    problem = PROBLEMS[NO_IMAGE] if table.flags[row] & NO_IMAGE else None
    return str(shard), int(table.offsets[row]), int(table.sizes[row]), problem


def member_problem(path: Path) -> Optional[str]:
    """Why a member path's sample cannot be used (no such sample, no image, a bad label); None when it can."""
    try:
        return _locate(path)[3]
    except FinetuneError as err:
        return str(err).split(": ", 1)[-1]


def read_member(path: Path) -> bytes:
    """A member path's image bytes (one pread); FinetuneError naming the problem when the sample cannot be used."""
    shard, offset, size, problem = _locate(path)
    if problem is not None:
        raise FinetuneError(f"cannot read image {path}: {problem}")
    fd = _FILES.get(shard)
    if fd is None:
        fd = _FILES[shard] = os.open(shard, os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise FinetuneError(f"cannot read image {path}: shard {shard} is truncated; copy it again")
    return data


def member_identity(path: Path) -> tuple:
    """What identifies a member's bytes for caches: the shard's size and modification time, and the member."""
    shard, name = member_of(path) or (path, "")
    info = shard.stat()
    return (str(shard.resolve()), info.st_size, info.st_mtime_ns, name)


# ---- the samples of a shard set ---------------------------------------------------------------------------------

class ShardSamples(SequenceABC):
    """A shard set's samples as a lazy sequence of Sample, in the order they were written. Length and class counts
    come from the index, where each image sits from the member table; nothing per sample is made until asked for."""

    def __init__(self, index: ShardIndex, num_classes: int) -> None:
        self.index = index
        self.num_classes = num_classes
        self.paths = [str(p) for p in index.shard_paths()]
        self.starts = [0]
        for entry in index.shards:
            self.starts.append(self.starts[-1] + entry.count)
        members = _load_members(index)
        self._tables: list[Optional[MemberTable]] = [members.get(entry.name) for entry in index.shards]
        self._register()

    def _register(self) -> None:
        for path, table in zip(self.paths, self._tables):
            if table is not None:
                _OWNERS[path] = table

    def __getstate__(self) -> dict:
        # A spawned loader worker maps the member files itself: pickled, every shard's view would carry a copy.
        return {**self.__dict__, "_tables": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        members = _load_members(self.index)
        self._tables = [members.get(entry.name) for entry in self.index.shards]
        self._register()

    @property
    def class_counts(self) -> Optional[list[int]]:
        """Samples per class, from the index (None when the spec names only part of the set)."""
        return list(self.index.class_counts) or None

    def __len__(self) -> int:
        return self.starts[-1]

    def table(self, shard: int) -> MemberTable:
        """The shard's member table (read from its headers when the member file lacks it), its size checked."""
        table = self._tables[shard]
        if table is None:
            table = read_table(Path(self.paths[shard]))
            _OWNERS[self.paths[shard]] = table
        if len(table) != self.index.shards[shard].count:
            raise FinetuneError(f"shard {self.paths[shard]} holds {len(table)} samples where its index "
                                f"{self.index.path} says {self.index.shards[shard].count}: it is truncated or was "
                                "replaced; copy it again or write the shard set again")
        self._tables[shard] = table
        return table

    def _target(self, table: MemberTable, row: int) -> tuple[Target, Optional[str]]:
        flags = int(table.flags[row])
        if flags & NO_IMAGE:
            return None, PROBLEMS[NO_IMAGE]
        if not self.index.labelled:
            return None, None
        if flags & (NO_LABEL | BAD_LABEL):
            return None, PROBLEMS[flags & (NO_LABEL | BAD_LABEL)]
        labels = table.labels(row)
        unknown = [k for k in labels if not 0 <= k < self.num_classes]
        if unknown:
            return None, (f"class index {unknown[0]} is not among the index's {self.num_classes} classes (write the "
                          "shards again if the classes changed)")
        return (labels if flags & LABEL_LIST else labels[0]), None

    def entry(self, index: int) -> tuple[Path, Target, Optional[str]]:
        """The index-th sample's member path, target, and why it cannot be used (None when it can)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect_right(self.starts, index) - 1
        table, row = self.table(shard), index - self.starts[shard]
        target, problem = self._target(table, row)
        path = Path(self.paths[shard]) / table.name(row)
        _RECENT[str(path)] = (self.paths[shard], int(table.offsets[row]), int(table.sizes[row]), problem)
        if len(_RECENT) > _RECENT_LIMIT:
            del _RECENT[next(iter(_RECENT))]
        return path, target, problem

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path, target, _ = self.entry(index)
        return Sample(path, target)

    def problems(self) -> list[tuple[Path, str]]:
        """(member path, reason) of every sample that cannot be used."""
        found = []
        for position in range(len(self)):
            path, _, problem = self.entry(position)
            if problem is not None:
                found.append((path, problem))
        return found
