"""Writing a shard set: streaming, one image in memory at a time, each shard complete or absent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from finetune.data.shard_members import MemberTable, save_members, scan_table
from finetune.data.shards import INDEX_SUFFIX, ShardEntry, ShardIndex, Target, escape_key

__all__ = ["write_shard_set"]

Log = Callable[[str], None]


def _label_member(target: Target) -> dict:
    if target is None:
        return {}
    if isinstance(target, tuple):
        return {"json": json.dumps({"labels": list(target)}).encode("utf-8")}
    return {"cls": str(int(target)).encode("ascii")}


def write_shard_set(items: Sequence[tuple[Path, str, Target]], plan: ShardIndex, shard_size: int,
                    log: Log = print) -> ShardIndex:
    """Write `items` (path, relative name, target) as the shard set `plan` describes (its index path, split, task,
    classes, source and skipped files): `{split}-NNNNNN.tar` shards of `shard_size` samples, their member table
    (`{split}-members.npy` ...), then the index. Streaming: one image in memory at a time. Each shard is written under a
    temporary name and renamed when complete (a stopped run leaves no half shard); the index is written last."""
    from webdataset import TarWriter  # only here: reading needs no webdataset

    out, split = plan.folder, plan.split
    out.mkdir(parents=True, exist_ok=True)
    entries: list[ShardEntry] = []
    tables: list[MemberTable] = []
    counts = [0] * len(plan.classes)
    for start in range(0, len(items), shard_size):
        name = f"{split}-{len(entries):06d}.tar"
        temporary = out / f".{name}.partial"
        chunk = items[start:start + shard_size]
        with temporary.open("wb") as handle:
            # PAX headers: names of any length; a fixed mtime: the same data writes the same bytes.
            writer = TarWriter(handle, encoder=False, mtime=0.0, format="PAX_FORMAT")
            for path, relative, target in chunk:
                key = escape_key(relative.rsplit(".", 1)[0])
                writer.write({"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes(),
                              **_label_member(target)})
                for k in (target if isinstance(target, tuple) else () if target is None else (target,)):
                    counts[k] += 1
            writer.close()
        tables.append(scan_table(temporary))  # where each member landed: one pass over the headers just written
        os.replace(temporary, out / name)
        entries.append(ShardEntry(name, len(chunk), (out / name).stat().st_size, start))
    save_members(out, split, tables)
    index = ShardIndex(plan.path, split, plan.task, list(plan.classes), entries, counts, plan.source, plan.skipped)
    temporary = out / f".{split}{INDEX_SUFFIX}.partial"
    temporary.write_text(json.dumps(index.to_json(), indent=1), encoding="utf-8")
    os.replace(temporary, index.path)
    log(f"{split}: {len(items)} images in {len(entries)} shard(s) of up to {shard_size} -> {index.path}")
    return index
