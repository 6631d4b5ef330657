"""What keeps start-up and memory flat on large folders: one listing per folder (order and file identities as the
per-file stats gave them), header checks from the first bytes, manifest rows looked up in the listing, and
samples packed for the loader's workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.config.recipe import DataConfig
from finetune.data.images import check_headers, file_identity, list_images, scan_images
from finetune.data.loaders import ImageDataset, PackedPaths
from finetune.data.sources import Sample, read_manifest


def _png(path: Path, value: int = 0, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, 0, 0)).save(path, fmt)
    return path


def test_the_listing_is_in_path_order_skips_hidden_entries_and_links_to_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ["b.png", "a/z.jpg", "a.b/c.png", "a/sub/x.PNG", ".hidden/y.png", "a/.dot.png", "a/notes.txt"]:
        _png(root / name) if not name.endswith(".txt") else (root / name).write_text("x")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "hard.png").hardlink_to(root / "b.png")
    paths, identities = scan_images(root, recursive=True)
    # The order of sorting whole paths (part by part): a/ before a.b/ although '/' > '.' as characters.
    assert paths == sorted(paths) == [root / "a/hard.png", root / "a/sub/x.PNG", root / "a/z.jpg",
                                      root / "a.b/c.png", root / "b.png"]
    assert identities == [file_identity(p) for p in paths]
    assert identities[0] == identities[-1]  # a hard link is the same file
    assert list_images(root) == [root / "b.png"]


def test_a_linked_image_gets_the_identity_of_its_target(tmp_path: Path) -> None:
    original = _png(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "link.png").symlink_to(original)
    paths, identities = scan_images(tmp_path / "data")
    assert identities[0] == identities[1] == file_identity(original)


def test_headers_are_judged_from_the_first_bytes_and_pillow_reads_the_rest(tmp_path: Path) -> None:
    good = [_png(tmp_path / "a.png"), _png(tmp_path / "jpeg_named.png", fmt="JPEG"),
            _png(tmp_path / "c.tif", fmt="TIFF"), _png(tmp_path / "d.webp", fmt="WEBP"),
            _png(tmp_path / "e.tga", fmt="TGA")]  # no known signature: Pillow opens it
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    bad = {p.path.name: p.reason for p in check_headers([*good, *(tmp_path / n for n in
                                                         ("empty.jpg", "text.jpg", "pipe.png", "dangling.png"))])}
    assert bad.keys() == {"empty.jpg", "text.jpg", "pipe.png", "dangling.png"}
    assert bad["empty.jpg"] == "empty file" and "FIFO" in bad["pipe.png"] and "broken symlink" in bad["dangling.png"]


def test_many_headers_are_checked_in_chunks_and_every_problem_is_kept(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("x")
    paths = [image] * 700 + [tmp_path / "bad.png"] * 3
    assert [p.path.name for p in check_headers(paths)] == ["bad.png"] * 3


def test_manifest_rows_are_found_by_path_by_spelling_and_by_stem(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _png(root / "images" / "cat_1.png")
    _png(root / "images" / "deep" / "dog_2.png")
    _png(root / ".hidden" / "cat_3.png")
    (root / "labels.csv").write_text("path,label\nimages/cat_1.png,cat\n./images//deep/dog_2.png,dog\n"
                                     "dog_2,dog\n.hidden/cat_3.png,cat\nimages/missing.png,cat\n")
    found = read_manifest(DataConfig(root=str(root), layout="csv", csv="labels.csv"), root)
    assert [(p.relative_to(root).as_posix(), label) for p, label in found.items] == [
        ("images/cat_1.png", "cat"), ("images/deep/dog_2.png", "dog"), (".hidden/cat_3.png", "cat")]
    assert found.identities == [file_identity(p) for p, _ in found.items]
    reasons = sorted(s.reason for s in found.skipped)
    assert reasons == ["listed in the manifest but no such image file", "same image as "
                       f"{root / 'images/deep/dog_2.png'} with the same label: used once"]


@pytest.mark.parametrize("targets", [[0, 2, 1], [(0, 1), (), (2,)]])
def test_the_dataset_packs_paths_and_gives_back_the_same_samples(tmp_path: Path, targets: list) -> None:
    paths = [_png(tmp_path / name, k * 50) for k, name in enumerate(["a.png", "ü nicode.png", "sub/c.png"])]
    dataset = ImageDataset([Sample(p, t) for p, t in zip(paths, targets)], lambda image: {"image": image.copy()},
                           encode=lambda sample: sample.target)
    assert len(dataset) == 3
    assert [dataset.sample(i) for i in range(3)] == [Sample(p, t) for p, t in zip(paths, targets)]
    image, target = dataset[1]
    assert image[0, 0, 0] == 50 and target == targets[1] and type(target) is type(targets[1])
    packed = PackedPaths(paths)
    assert [packed[i] for i in range(3)] == paths and isinstance(packed.ends, np.ndarray)
