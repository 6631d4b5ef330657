"""Safe image discovery and decoding: odd modes converted, broken files reported, never fatal."""

from __future__ import annotations

import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.portable import decode_rgb
from finetune.data.shard_members import member_of, member_problem, read_member
from finetune.errors import FinetuneError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SkippedImage",
    "is_image_file",
    "file_identity",
    "not_a_file",
    "list_images",
    "scan_images",
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

    Checked before opening: reading a FIFO would block forever and a link to /dev/zero never ends. A sample in a
    shard (`.../train-000003.tar/cat/001.jpg`) is checked when it is read.
    """
    if member_of(path) is not None:
        return None
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
    """Image files in `folder` (and, with `recursive`, its sub-folders, not following links to folders), in path
    order; hidden files and folders are ignored."""
    return scan_images(folder, recursive)[0]


def scan_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[tuple]]:
    """`list_images`, and each image's `file_identity`, read with the folder listing (no stat per file but links)."""
    if not folder.is_dir():
        raise FinetuneError(f"image folder not found: {folder}")
    found: list[Path] = []
    identities: list[tuple] = []
    _scan(folder, recursive, found, identities)
    return found, identities


def _scan(folder: Path, recursive: bool, found: list[Path], identities: list[tuple]) -> None:
    """Append `folder`'s images to `found`, each folder's entries in name order, a sub-folder's images where its
    name sorts: the order of sorting the whole paths, without sorting a million Path objects.

    os.scandir reads each entry's type and inode with its name: a folder of a million files costs no stat per file.
    """
    device = os.stat(folder).st_dev
    with os.scandir(folder) as entries:
        named = sorted((entry.name, entry) for entry in entries if not entry.name.startswith("."))
    for name, entry in named:
        try:
            is_dir = entry.is_dir()  # follows a link: a link to a folder is not an image
        except OSError:
            is_dir = False
        if is_dir:
            if recursive and not entry.is_symlink():
                _scan(folder / name, recursive, found, identities)
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            path = folder / name
            found.append(path)
            identities.append(file_identity(path) if entry.is_symlink() else ("inode", device, entry.inode()))


def load_rgb(path: Path, min_side: Optional[int] = None) -> np.ndarray:
    """Decode an image as an HxWx3 uint8 RGB array (EXIF-rotated; alpha over white; portable.decode_rgb).

    With `min_side`, a JPEG may be decoded at reduced scale, its shorter side still >= `min_side`.
    Raises FinetuneError when the file is empty, truncated or not an image.
    """
    if member_of(path) is not None:  # a shard's sample: its bytes, one pread (read_member words its problems)
        source: object = io.BytesIO(read_member(path))
    else:
        problem = not_a_file(path)
        if problem:
            raise FinetuneError(f"cannot read image {path}: {problem}")
        source = path
    try:
        return decode_rgb(source, min_side)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else str(err) or type(err).__name__
        raise FinetuneError(f"cannot read image {path}: {reason}") from None


def _check_one(path: Path) -> Optional[SkippedImage]:
    try:
        load_rgb(path)
    except FinetuneError as err:
        return SkippedImage(path, str(err).split(": ", 1)[-1])
    return None


def _check_chunk(paths: list[Path]) -> list[SkippedImage]:
    return [problem for problem in map(_check_one, paths) if problem is not None]


def check_images(paths: list[Path], workers: int = 4) -> list[SkippedImage]:
    """Decode every image once (threads: PIL releases the GIL) and return those that fail; 64 images per task (a
    thread pool ignores map's chunksize: one future per image would cost more than a small image's decode)."""
    chunks = [paths[start:start + 64] for start in range(0, len(paths), 64)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [problem for found in pool.map(_check_chunk, chunks) for problem in found]


# The first bytes of the formats IMAGE_EXTENSIONS names: a file that starts with one is taken as an image without
# asking Pillow to parse its header (10x cheaper, what a million-image folder needs); any other goes to Pillow.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
               b"II+\x00", b"MM\x00+", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_CHUNK = 256  # paths per thread-pool task: one future per file would cost more than the check


def _first_bytes(path: Path) -> tuple[Optional[bytes], Optional[str]]:
    """The file's first 16 bytes, or why it cannot be read as a regular file. One non-blocking open: a FIFO does
    not block it, and fstat tells a regular file from a device before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        return None, not_a_file(path) or err.strerror or type(err).__name__
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, not_a_file(path) or "not a regular file"
        return os.read(fd, 16), None
    finally:
        os.close(fd)


def _header_problem(path: Path) -> Optional[SkippedImage]:
    if member_of(path) is not None:  # a shard's sample: its headers were checked when the shard was written
        problem = member_problem(path)
        return SkippedImage(path, problem) if problem else None
    head, problem = _first_bytes(path)
    if problem:
        return SkippedImage(path, problem)
    if head is not None and (head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return None
    try:
        with Image.open(path) as image:
            image.size  # the header is parsed; the pixels are not decoded
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = "empty file" if not head else str(err) or type(err).__name__
        return SkippedImage(path, reason)
    return None


def _header_problems(paths: list[Path]) -> list[SkippedImage]:
    return [problem for problem in map(_header_problem, paths) if problem is not None]


def check_headers(paths: list[Path], workers: int = 4) -> list[SkippedImage]:
    """Files that are not images at all (empty, wrong format, not a regular file), from their first bytes (Pillow's
    header parser for a format without a known signature): no pixel is decoded.

    A truncated or damaged image passes; the loader finds it when it decodes it (and the run lists it).
    """
    chunks = [paths[start:start + _CHUNK] for start in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [problem for found in pool.map(_header_problems, chunks) for problem in found]
