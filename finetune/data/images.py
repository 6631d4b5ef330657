"""Safe image discovery and decoding: odd modes converted, broken files reported, never fatal."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.portable import decode_rgb
from finetune.errors import FinetuneError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SkippedImage",
    "is_image_file",
    "file_identity",
    "not_a_file",
    "list_images",
    "load_rgb",
    "check_images",
    "check_headers",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True)
class SkippedImage:
    """A file that could not be used, and why."""

    path: Path
    reason: str


def is_image_file(path: Path) -> bool:
    """True for a visible entry with an image extension (case-insensitive) that is not a folder.

    Entries that only look like images — a FIFO, a device, a dangling symlink — count too, so that
    they are listed with their reason (`not_a_file`) instead of vanishing from a count.
    """
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir()


def not_a_file(path: Path) -> Optional[str]:
    """Why `path` is not a regular file that can be read as an image (None when it is one).

    Checked before opening: reading a FIFO would block forever and a link to /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symlink to {os.readlink(path)}"
        return "no such file"
    except OSError as err:
        return err.strerror or type(err).__name__
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"{kind}, not an image file"


def file_identity(path: Path) -> tuple:
    """What makes two paths one file: device and inode (symlinks and hard links alike), else the resolved path."""
    try:
        info = os.stat(path)
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted; hidden files and folders are ignored."""
    if not folder.is_dir():
        raise FinetuneError(f"image folder not found: {folder}")
    candidates: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if is_image_file(path):
            found.append(path)
    return sorted(found)


def load_rgb(path: Path, min_side: Optional[int] = None) -> np.ndarray:
    """Decode an image as an HxWx3 uint8 RGB array (EXIF-rotated; alpha over white; portable.decode_rgb).

    With `min_side`, a JPEG may be decoded at reduced scale, its shorter side still >= `min_side`.
    Raises FinetuneError when the file is empty, truncated or not an image.
    """
    problem = not_a_file(path)
    if problem:
        raise FinetuneError(f"cannot read image {path}: {problem}")
    try:
        return decode_rgb(path, min_side)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else str(err) or type(err).__name__
        raise FinetuneError(f"cannot read image {path}: {reason}") from None


def _check_one(path: Path) -> Optional[SkippedImage]:
    try:
        load_rgb(path)
    except FinetuneError as err:
        return SkippedImage(path, str(err).split(": ", 1)[-1])
    return None


def check_images(paths: list[Path], workers: int = 4) -> list[SkippedImage]:
    """Decode every image once (threads: PIL releases the GIL) and return those that fail."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_one, paths, chunksize=64)
        return [r for r in results if r is not None]


def _header_problem(path: Path) -> Optional[SkippedImage]:
    problem = not_a_file(path)
    if problem:
        return SkippedImage(path, problem)
    try:
        with Image.open(path) as image:
            image.size  # the header is parsed; the pixels are not decoded
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else str(err) or type(err).__name__
        return SkippedImage(path, reason)
    return None


def check_headers(paths: list[Path], workers: int = 4) -> list[SkippedImage]:
    """Files that are not images at all (empty, wrong format), from their headers only: no pixel is decoded.

    A truncated or damaged image passes; the loader finds it when it decodes it (and the run lists it).
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for r in pool.map(_header_problem, paths, chunksize=64) if r is not None]
