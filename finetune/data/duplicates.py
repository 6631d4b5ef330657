"""The same picture twice: byte-identical files (a content hash), copies (tiny thumbnails, embeddings), outliers.

Byte-identical copies are found cheaply: only files whose size another file shares are read and hashed, so a
folder of 10 000 photos with a handful of copies reads a handful of files. A resized or re-encoded copy is found
by its 8x8 grey thumbnail (mean removed, unit length: the idea behind average hashes, compared by cosine rather
than bits): on Fashion-MNIST a 28 -> 30 px resized copy stays within 0.0002 of its original while no two different
garments come closer than 0.001. A cropped or recoloured copy needs the backbone's embeddings: a pair much closer
than either image's ordinary neighbours (`similar_pairs`). Outliers are the images farthest from their nearest
neighbours in the embedding space.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from finetune.data.images import load_rgb
from finetune.errors import FinetuneError

__all__ = ["KINDS", "DuplicatePair", "content_hash", "identical_files", "thumbnails", "close_pairs", "similar_pairs",
           "outlier_scores", "flag_outliers", "BLOCK", "THUMB_SIDE"]

BLOCK = 2048  # rows of the similarity matrix computed at once: 2048 x N float32 (80 MB at N = 10 000)
THUMB_SIDE = 8  # grey thumbnail side: coarse enough to ignore a resize or a re-encoding, fine enough to tell apart


KINDS = ("identical bytes", "thumbnail", "embedding")  # how a pair was found, the surest first


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that hold the same picture: their paths, splits (train / val / test), how the pair was found
    (KINDS) and the cosine similarity of what was compared (1.0 for byte-identical files)."""

    path_a: Path
    path_b: Path
    split_a: str
    split_b: str
    similarity: float
    kind: str = "embedding"

    @property
    def leak(self) -> bool:
        """True when the two are in different splits (a training image among the validation or test images)."""
        return self.split_a != self.split_b


def content_hash(path: Path, chunk: int = 1 << 20) -> Optional[str]:
    """SHA-1 of the file's bytes; None when it cannot be read."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _size(path: Path) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def identical_files(splits: Mapping[str, Sequence[Path]], across_only: bool = False) -> list[DuplicatePair]:
    """Byte-identical files among the splits' images (split name → paths), hashing only files of a shared size.

    `across_only` keeps pairs from different splits (the leak check before training). The same file listed twice
    (one path) is not a pair.
    """
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for split, paths in splits.items():
        for path in paths:
            size = _size(path)
            if size:
                by_size[size].append((split, path))
    pairs = []
    for group in by_size.values():
        if len(group) < 2 or (across_only and len({split for split, _ in group}) < 2):
            continue
        by_hash: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for split, path in group:
            digest = content_hash(path)
            if digest:
                by_hash[digest].append((split, path))
        for same in by_hash.values():
            for i, (split_a, a) in enumerate(same):
                for split_b, b in same[i + 1:]:
                    if a != b and (split_a != split_b or not across_only):
                        pairs.append(DuplicatePair(a, b, split_a, split_b, 1.0, KINDS[0]))
    return sorted(pairs, key=lambda p: (str(p.path_a), str(p.path_b)))


def _thumbnail(path: Path) -> np.ndarray:
    """The image's THUMB_SIDE x THUMB_SIDE grey thumbnail, mean removed, unit length (zeros when it does not decode
    or is flat: such an image matches nothing here)."""
    try:
        image = Image.fromarray(load_rgb(path, min_side=4 * THUMB_SIDE)).convert("L")
    except (FinetuneError, OSError, ValueError):
        return np.zeros(THUMB_SIDE * THUMB_SIDE, dtype=np.float32)
    pixels = np.asarray(image.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 1e-3 else np.zeros_like(pixels)


def thumbnails(paths: Sequence[Path], workers: int = 4) -> np.ndarray:
    """The grey thumbnails (N, THUMB_SIDE**2) of `paths`, decoded at reduced size where the format allows."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        rows = list(pool.map(_thumbnail, paths))
    return np.stack(rows) if rows else np.zeros((0, THUMB_SIDE * THUMB_SIDE), dtype=np.float32)


def close_pairs(vectors: np.ndarray, paths: Sequence[Path], splits: Sequence[str], threshold: float,
                kind: str = "thumbnail") -> list[DuplicatePair]:
    """Pairs whose (already unit-length) vectors' cosine similarity is at least `threshold`, most similar first."""
    pairs = []
    for start in range(0, len(vectors), BLOCK):
        block = vectors[start:start + BLOCK] @ vectors.T
        rows, cols = np.nonzero(block >= threshold)
        for row, col in zip(rows, cols):
            i, j = start + int(row), int(col)
            if j > i:  # each pair once, no image with itself
                pairs.append(DuplicatePair(paths[i], paths[j], splits[i], splits[j], float(block[row, col]), kind))
    return sorted(pairs, key=lambda p: -p.similarity)


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def similar_pairs(embeddings: np.ndarray, paths: Sequence[Path], splits: Sequence[str], threshold: float,
                  ratio: float = 0.25, neighbours: int = 10) -> list[DuplicatePair]:
    """Pairs of images that are copies of each other in embedding space, most similar first.

    A pair counts when its cosine similarity reaches `threshold` and its distance (1 - similarity) is at most
    `ratio` times the smaller of the two images' typical neighbour distance (`outlier_scores`: the mean distance
    to their `neighbours` nearest). The second test is Lowe's ratio test made robust to a few copies: a copy is
    much closer than the image's ordinary neighbours, whatever the backbone's scale — two plain white t-shirts
    are similar, but no closer than their other neighbours.
    """
    vectors = _normalised(embeddings)
    scale = outlier_scores(vectors, neighbours)
    index = {path: i for i, path in enumerate(paths)}
    return [pair for pair in close_pairs(vectors, paths, splits, threshold, "embedding")
            if 1.0 - pair.similarity <= ratio * min(scale[index[pair.path_a]], scale[index[pair.path_b]])]


def outlier_scores(embeddings: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """Each image's mean cosine distance to its `neighbours` nearest other images (N,): high = unlike the rest."""
    vectors = _normalised(embeddings)
    k = max(1, min(neighbours, len(vectors) - 1))
    scores = np.zeros(len(vectors), dtype=np.float64)
    for start in range(0, len(vectors), BLOCK):
        distance = 1.0 - vectors[start:start + BLOCK] @ vectors.T
        for row in range(len(distance)):
            distance[row, start + row] = np.inf  # not its own neighbour
        nearest = np.partition(distance, k - 1, axis=1)[:, :k]
        scores[start:start + len(distance)] = nearest.mean(axis=1)
    return scores


def flag_outliers(scores: np.ndarray, spread: float = 6.0) -> np.ndarray:
    """Indices of outlying scores, worst first: above the median by more than `spread` median absolute deviations
    (a robust rule: a few outliers do not move the median or the MAD the way they move a mean and a std)."""
    if len(scores) < 3:
        return np.zeros(0, dtype=int)
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median))) or 1e-12
    flagged = np.nonzero(scores > median + spread * 1.4826 * mad)[0]  # 1.4826: a MAD in a normal's std units
    return flagged[np.argsort(-scores[flagged])]
