"""Figures: drawn on bare matplotlib Figures (never pyplot, never a backend switch), each a real, non-blank PNG."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.engine.fit import HISTORY_COLUMNS
from finetune.engine.lr_find import LrFindResult, suggest_lr
from finetune.outputs.figures.augment_grid import save_augment_grid
from finetune.outputs.figures.calibration import calibration_bins, plot_reliability
from finetune.outputs.figures.gallery import Tile, plot_gallery
from finetune.outputs.figures.lr_plot import plot_lr_find
from finetune.outputs.figures.plots import plot_confusion_matrix, plot_curves

TESTS = Path(__file__).resolve().parent
FIGURE_MODULES = ["plots", "calibration", "gallery", "lr_plot", "augment_grid"]

# Matplotlib's default colour cycle, and the darkest "Blues" cell of a confusion matrix.
C0, C1, C2, C3 = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)
DARKEST_BLUE = (8, 48, 107)
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _history() -> list[dict]:
    """Three epochs of history rows, typed as fit() writes them (lr as a string)."""
    rows = []
    for epoch in (1, 2, 3):
        values = {"epoch": epoch, "train_loss": 1.2 / epoch, "train_acc": 0.3 * epoch, "val_loss": 1.0 / epoch + 0.1,
                  "val_acc": 0.25 * epoch + 0.1, "lr": f"{1e-3 / epoch:.6g}", "seconds": 1.5}
        rows.append({key: values[key] for key in HISTORY_COLUMNS})
    return rows


def _lr_result() -> LrFindResult:
    """A sweep with a loss valley and a diverging tail, with the rates suggest_lr picks for it."""
    lrs = np.logspace(-6, 0, 60)
    losses = 2.0 - 1.2 / (1 + np.exp(-3 * (np.log10(lrs) + 4))) + np.where(lrs > 1e-2, 40 * (lrs - 1e-2), 0)
    raw = losses + np.random.default_rng(0).normal(0, 0.05, size=losses.size)
    suggestion, steepest = suggest_lr(lrs.tolist(), losses.tolist())
    return LrFindResult(lrs.tolist(), losses.tolist(), raw.tolist(), suggestion, steepest, diverged=True)


def draw_all(folder: Path) -> dict[str, Path]:
    """One PNG from each plotting function, from tiny synthetic inputs."""
    out = {name: folder / f"{name}.png" for name in ("confusion", "curves", "reliability", "gallery", "lr")}
    plot_confusion_matrix(np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]]), ["cat", "dog", "bird"], out["confusion"])
    plot_curves(_history(), out["curves"])
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([0.6, 0.6, 0.6], size=60)
    y_true = np.where(rng.random(60) < 0.7, probs.argmax(axis=1), rng.integers(0, 3, size=60))
    plot_reliability(calibration_bins(probs, y_true), out["reliability"])
    grey = np.full((24, 24, 3), 128, dtype=np.uint8)
    tiles = [Tile(np.full((24, 24, 3), MAGENTA, dtype=np.uint8), "plain\ntrue a"),
             Tile(grey, "with heat", heat=np.ones((7, 7)))]
    plot_gallery(tiles, out["gallery"], "two tiles")
    assert plot_lr_find(_lr_result(), out["lr"]) == out["lr"]
    # Normalised so that denormalise() gives back plain cyan images.
    cyan = (torch.tensor(CYAN, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    images = cyan.view(1, 3, 1, 1).expand(4, 3, 16, 16)
    out["augment"] = folder / "nested" / "augment.png"
    assert save_augment_grid(images, ["a", "b", "c", "d"], MEAN, STD, out["augment"], "four views") == out["augment"]
    return out


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, Path]:
    return draw_all(tmp_path_factory.mktemp("figures"))


def _pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG as an (H, W, 3) array, after checking that PIL opens it at the expected size."""
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "a blank, single-colour image"
    return pixels


def _count(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels within `tolerance` of `colour` in every channel."""
    return int((np.abs(pixels.astype(int) - np.array(colour)) <= tolerance).all(axis=-1).sum())


def test_confusion_matrix_draws_both_panels(drawn):
    pixels = _pixels(drawn["confusion"], (1210, 550))  # figsize (11, 5) at 110 dpi
    left, right = pixels[:, :605], pixels[:, 605:]
    # Each panel's largest cell is drawn in the darkest blue (counts, and recall 6/7 of its own scale).
    assert _count(left, DARKEST_BLUE) > 500 and _count(right, DARKEST_BLUE) > 500


def test_curves_draw_loss_accuracy_and_lr(drawn):
    pixels = _pixels(drawn["curves"], (1400, 400))
    loss, accuracy, lr = pixels[:, :467], pixels[:, 467:933], pixels[:, 933:]
    for panel in (loss, accuracy):  # train (C0) and val (C1) lines in the first two panels
        assert _count(panel, C0) > 100 and _count(panel, C1) > 100
    assert _count(lr, C0) > 100


def test_reliability_diagram_draws_bars_markers_and_histogram(drawn):
    pixels = _pixels(drawn["reliability"], (550, 650))
    for colour in ((76, 114, 176), (196, 78, 82), (85, 168, 104)):  # accuracy bars, confidence marks, counts
        assert _count(pixels, colour, tolerance=8) > 50, colour


def test_gallery_draws_tiles_and_heat_maps(drawn):
    pixels = _pixels(drawn["gallery"], (700, 310))  # at least 7 inches wide even for two tiles
    assert _count(pixels, MAGENTA) > 2000
    # jet's top colour (dark red) at alpha 0.45 over mid grey.
    assert _count(pixels, (128, 70, 70), tolerance=6) > 2000


def test_lr_plot_draws_the_sweep_and_the_suggestion(drawn):
    pixels = _pixels(drawn["lr"], (700, 450))
    assert _count(pixels, C0) > 200  # smoothed loss
    assert _count(pixels, C3) > 50  # suggested rate
    assert _count(pixels, C2) > 50  # steepest descent, away from the suggestion here
    assert _lr_result().steepest is not None


def test_augment_grid_draws_the_denormalised_images(drawn):
    pixels = _pixels(drawn["augment"], (700, 570))  # four images: 2 x 2 grid
    assert _count(pixels, CYAN, tolerance=2) > 4 * 1000


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        before = matplotlib.get_backend()
        assert before == "svg", before
        import {", ".join(f"finetune.outputs.figures.{name}" for name in FIGURE_MODULES)}
        assert "matplotlib.pyplot" not in sys.modules, "importing the figure modules imported pyplot"
        assert matplotlib.get_backend() == matplotlib.rcParams["backend"] == "svg", matplotlib.get_backend()
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from test_figures import draw_all
        draw_all(Path({str(tmp_path)!r}))
        assert "matplotlib.pyplot" not in sys.modules, "drawing imported pyplot"
        assert matplotlib.get_backend() == matplotlib.rcParams["backend"] == "svg", matplotlib.get_backend()
        print("backend kept")
    """)
    env = {**os.environ, "MPLBACKEND": "svg"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=TESTS.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend kept" in done.stdout
    assert len(list(tmp_path.rglob("*.png"))) == 6
