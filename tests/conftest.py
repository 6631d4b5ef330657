"""Shared fixtures: tiny generated image datasets in each layout, and a tiny fast recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Absolute paths, so the tests pass from any working directory (e.g. `cd /tmp && pytest /path/to/tests`).
REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
QUICK_CPU = str(RECIPES / "quick_cpu.yaml")  # a str: it goes into CLI argv lists

# A headless browser for the pages' rendering tests (report.html, audit.html); None skips them.
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
# Flags for a sandbox-less root container with no network: nothing may phone home or wait on a GPU.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
# Writes each image's decoded width into the DOM once everything has loaded, for --dump-dom to show.
PROBE = ("<script>window.addEventListener('load',()=>{for(const i of document.images)"
         "{i.setAttribute('data-natural-width',String(i.naturalWidth))}"
         "document.body.setAttribute('data-loaded','yes')})</script>")


# Three easy classes: the dominant colour channel decides the class.
COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}


def make_image(colour: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    """A noisy image around `colour` with a random bright square, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)[None, None, :]
    array = base + rng.normal(0, 25, size=(size, size, 3))
    x, y = rng.integers(0, size - 10, size=2)
    array[y : y + 10, x : x + 10] += 40
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def write_folder_dataset(root: Path, per_class: int = 12, val_per_class: int = 4, test: int = 6) -> Path:
    """root/train/<class>/*.jpg, root/val/<class>/*.jpg and an unlabeled root/test/."""
    seed = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                make_image(colour, seed).save(folder / f"{name}_{i}.jpg")
    (root / "test").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    for i in range(test):
        seed += 1
        make_image(colours[i % 3], seed).save(root / "test" / f"{i + 1:04d}.jpg")
    return root


def write_hw03_dataset(root: Path, per_class: int = 10, val_per_class: int = 4, test: int = 6) -> Path:
    """HW03 layout: training/3_120.jpg, validation/..., test/0001.jpg; labels 0..2."""
    seed = 1000
    colours = list(COLOURS.values())
    for split, count in (("training", per_class), ("validation", val_per_class)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for label, colour in enumerate(colours):
            for i in range(count):
                seed += 1
                make_image(colour, seed).save(folder / f"{label}_{i}.jpg")
    (root / "test").mkdir(parents=True, exist_ok=True)
    for i in range(test):
        seed += 1
        make_image(colours[i % 3], seed).save(root / "test" / f"{i + 1:04d}.jpg")
    return root


TINY_OVERRIDES = [
    "model.backbone=test_resnet",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.epochs=2",
    "train.lr=0.01",
    "augment.preset=light",
]


@pytest.fixture
def one_torch_thread():
    """Train on one intra-op thread: on 2 busy cores a second thread mostly waits (~10x slower steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "shapes")


@pytest.fixture
def hw03_dataset(tmp_path: Path) -> Path:
    return write_hw03_dataset(tmp_path / "food")


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return TINY_OVERRIDES + [f"output={tmp_path / 'runs'}"]
