"""Data sources and image decoding: every layout, odd and broken images, clear errors."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from conftest import make_image, write_folder_dataset, write_hw03_dataset
from finetune.data.images import check_images, list_images, load_rgb
from finetune.data.sources import discover
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig


def test_folder_layout_with_val_folder(tmp_path):
    root = write_folder_dataset(tmp_path / "d")
    splits = discover(DataConfig(root=str(root)))
    assert splits.classes == ["blue", "green", "red"]
    assert len(splits.train) == 36 and len(splits.val) == 12
    assert splits.val_source == "folder"
    assert splits.test_dir == root / "test"


def test_hw03_filename_layout_numeric_classes(tmp_path):
    root = write_hw03_dataset(tmp_path / "food")
    splits = discover(DataConfig(root=str(root)))
    assert splits.classes == ["0", "1", "2"]
    labels = {s.path.name.split("_")[0]: s.target for s in splits.train}
    assert labels == {"0": 0, "1": 1, "2": 2}


def test_numeric_class_names_sort_as_numbers(tmp_path):
    folder = tmp_path / "training"
    folder.mkdir()
    for label in (0, 2, 10):
        for i in range(2):
            make_image((100, 100, 100), label * 10 + i).save(folder / f"{label}_{i}.jpg")
    splits = discover(DataConfig(root=str(tmp_path), val_fraction=0.5))
    assert splits.classes == ["0", "2", "10"]


def test_custom_label_regex(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("cat", "dog"):
        for i in range(3):
            make_image((50, 90, 130), i).save(folder / f"img-{i}-{name}.png")
    splits = discover(DataConfig(root=str(tmp_path), layout="filename", label_regex=r"-(\w+)\.png$", val_fraction=0.34))
    assert splits.classes == ["cat", "dog"]


def test_stratified_split_is_seeded_and_stratified(tmp_path):
    root = write_folder_dataset(tmp_path / "d")
    cfg = DataConfig(root=str(root), val=None, val_fraction=0.25)
    a, b = discover(cfg, seed=3), discover(cfg, seed=3)
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert a.val_source == "split"
    per_class = [sum(1 for s in a.val if s.target == k) for k in range(3)]
    assert per_class == [3, 3, 3]


def test_csv_manifest_with_kaggle_ids(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,label"]
    for i in range(8):
        make_image((200, 40, 40) if i % 2 else (40, 40, 200), i).save(images / f"{i:03d}.jpg")
        rows.append(f"{i:03d},{'red' if i % 2 else 'blue'}")
    rows.append("999,red")  # listed but missing: skipped and reported, not fatal
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(root=str(tmp_path), layout="csv", csv="labels.csv", csv_image_dir="images", val_fraction=0.5)
    splits = discover(cfg)
    assert splits.classes == ["blue", "red"]
    assert len(splits.train) + len(splits.val) == 8
    assert [s.reason for s in splits.skipped] == ["listed in the manifest but no such image file"]


def test_missing_folder_and_empty_class(tmp_path):
    with pytest.raises(FinetuneError, match="dataset folder not found"):
        discover(DataConfig(root=str(tmp_path / "nope")))
    root = write_folder_dataset(tmp_path / "d")
    (root / "train" / "empty").mkdir()
    with pytest.raises(FinetuneError, match="class 'empty' has no images"):
        discover(DataConfig(root=str(root)))


def test_hidden_files_and_uppercase_extensions(tmp_path):
    make_image((1, 2, 3), 0).save(tmp_path / "A.JPG", format="JPEG")
    make_image((1, 2, 3), 1).save(tmp_path / ".hidden.jpg")
    (tmp_path / ".cache").mkdir()
    make_image((1, 2, 3), 2).save(tmp_path / ".cache" / "x.jpg")
    (tmp_path / "notes.txt").write_text("hi")
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["A.JPG"]


def test_odd_modes_are_converted_to_rgb(tmp_path):
    rgb = np.asarray(make_image((120, 60, 30), 0))
    paths = {
        "gray.png": Image.fromarray(rgb[..., 0], "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "sixteen.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    for name, image in paths.items():
        image.save(tmp_path / name)
        array = load_rgb(tmp_path / name)
        assert array.dtype == np.uint8 and array.shape == (40, 40, 3), name
        assert 20 < array.mean() < 240, name  # content survived the conversion


def test_broken_files_are_reported_not_fatal(tmp_path):
    good = tmp_path / "good.jpg"
    make_image((10, 20, 30), 0).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    skipped = check_images(sorted(tmp_path.iterdir()))
    assert sorted(s.path.name for s in skipped) == ["empty.jpg", "text.png", "truncated.jpg"]
    assert any("empty file" in s.reason for s in skipped)
    with pytest.raises(FinetuneError, match="cannot read image"):
        load_rgb(tmp_path / "truncated.jpg")


def test_a_loader_worker_reports_errors_but_not_the_broken_pipe_of_an_interrupted_main_process():
    """After Ctrl-C the resource sharer's broken pipe is expected noise; any other error still prints."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from finetune.data.loaders import make_loader\n"
        "class Probe(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 1\n"
        "    def __getitem__(self, i):\n"
        "        sys.excepthook(BrokenPipeError, BrokenPipeError(32, 'Broken pipe'), None)\n"
        "        sys.excepthook(ValueError, ValueError('a real error'), None)\n"
        "        return torch.zeros(1)\n"
        "list(make_loader(Probe(), 1, 1))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "a real error" in result.stderr
    assert "Broken pipe" not in result.stderr
