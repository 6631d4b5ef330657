"""Pre-resized image cache (`data.cache: ram | disk`): decode and downscale each image once, reuse it every epoch.

Images are stored with their shorter side at the size the transform's first resize needs (see
transforms.train_decode_side / eval_decode_side), never upscaled, so later epochs skip the JPEG decode
and most of the resize. `ram` holds every image in one shared-memory tensor filled in the main process:
DataLoader workers read the same pages (fork or spawn) instead of each building its own copy.
`disk` keeps one .npy file per image under `data.cache_dir`, named from the file's absolute path, size,
modification time and the stored size, so a changed or replaced file is decoded again, and runs reuse it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch

from finetune.data.images import load_rgb
from finetune.data.shard_members import member_identity, member_of
from finetune.errors import FinetuneError

__all__ = ["CACHE_MODES", "ImageCache", "default_cache_dir", "shrink"]

CACHE_MODES = ("none", "disk", "ram")


def default_cache_dir() -> Path:
    """~/.cache/finetune/images (or $XDG_CACHE_HOME/finetune/images)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune" / "images"


def shrink(image: np.ndarray, min_side: Optional[int]) -> np.ndarray:
    """Downscale so the shorter side is `min_side` (area interpolation); smaller images are kept as they are."""
    height, width = image.shape[:2]
    if not min_side or min(height, width) <= min_side:
        return image
    scale = min_side / min(height, width)
    size = (max(min_side, round(width * scale)), max(min_side, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _decode(path: Path, min_side: Optional[int]) -> Union[np.ndarray, str]:
    """The resized image, or the reason it cannot be read."""
    try:
        return shrink(load_rgb(path, min_side), min_side)
    except FinetuneError as err:
        return str(err)


class ImageCache:
    """Images decoded once at `min_side`; `read(path)` is a drop-in for `load_rgb`."""

    def __init__(self, mode: str, folder: Optional[Path], min_side: Optional[int]) -> None:
        if mode not in ("disk", "ram"):
            raise FinetuneError(f"data.cache is {mode!r}; valid choices: {', '.join(CACHE_MODES)}")
        self.mode = mode
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()
        self.min_side = min_side
        # ram: one flat uint8 tensor in shared memory, and where each image sits in it.
        self.pixels = torch.empty(0, dtype=torch.uint8)
        self.index: dict[Path, tuple[int, int, int]] = {}
        self.errors: dict[Path, str] = {}

    def fill(self, paths: Sequence[Path], workers: int = 4) -> None:
        """ram: decode every image not yet held (threads: PIL and OpenCV release the GIL), once, in this process."""
        if self.mode != "ram":
            return
        wanted = [p for p in dict.fromkeys(paths) if p not in self.index and p not in self.errors]
        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda p: _decode(p, self.min_side), wanted))
        images = [(p, d) for p, d in zip(wanted, decoded) if isinstance(d, np.ndarray)]
        self.errors.update({p: d for p, d in zip(wanted, decoded) if isinstance(d, str)})
        offset = self.pixels.numel()
        pixels = torch.empty(offset + sum(d.size for _, d in images), dtype=torch.uint8)
        pixels[:offset] = self.pixels
        for path, image in images:
            pixels[offset:offset + image.size] = torch.from_numpy(image.reshape(-1))
            self.index[path] = (offset, image.shape[0], image.shape[1])
            offset += image.size
        self.pixels = pixels.share_memory_()

    def read(self, path: Path) -> np.ndarray:
        """The cached HxWx3 uint8 image (decoded now if it is not cached yet); FinetuneError if unreadable."""
        if self.mode == "ram":
            if path in self.errors:
                raise FinetuneError(self.errors[path])
            if path in self.index:
                offset, height, width = self.index[path]
                return self.pixels[offset:offset + height * width * 3].numpy().reshape(height, width, 3)
            return shrink(load_rgb(path, self.min_side), self.min_side)  # not filled: decode, as without a cache
        return self._read_disk(Path(path))

    def key(self, path: Path) -> str:
        """The disk cache's file name: a hash of the absolute path, file size, modification time and stored size."""
        if member_of(path) is not None:  # a sample in a shard: the shard's size and time, and the member
            text = f"{member_identity(path)}|{self.min_side}"
        else:
            stat = path.stat()
            text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.min_side}"
        return hashlib.sha1(text.encode()).hexdigest() + ".npy"

    def _read_disk(self, path: Path) -> np.ndarray:
        try:
            cached = self.folder / self.key(path)
        except OSError as err:
            raise FinetuneError(f"cannot read image {path}: {err}") from None
        if cached.exists():
            try:
                return np.load(cached)
            except (OSError, ValueError):
                pass  # a damaged cache file: decode again and replace it
        image = shrink(load_rgb(path, self.min_side), self.min_side)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written to a temporary name and renamed: parallel workers never read half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.save(out, np.ascontiguousarray(image))
            os.replace(temporary, cached)
        except OSError:
            Path(temporary).unlink(missing_ok=True)  # a full or read-only cache folder only costs speed
        return image
