"""The quickstart notebook runs top to bottom on a reduced size, shows what its text promises, and is stored clean.

Its markdown promises: one training image per class, a fine-tuning run, where it fails (the confusion
matrix of the run's eval/), and a scored Kaggle-style submission.csv. Each figure must exist as a real,
non-blank PNG in the run folder and be displayed inline byte for byte, so a missing figure fails here
instead of being hidden by the other images.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from finetune.workflows.datasets import DEBIAN_FASHION_MNIST

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEST_LIMIT = 200
# Figures written to the run folder that the notebook displays (path in the run folder → what it is).
PROMISED_FIGURES = {
    "curves.png": "training curves",
    "eval/confusion_matrix.png": "validation confusion matrix ('Where does it fail?')",
    "test_eval/confusion_matrix.png": "confusion matrix of the scored submission",
}


def shown_pngs(cell: Any) -> list[bytes]:
    """The PNG images a code cell displayed, decoded."""
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def printed(cell: Any) -> str:
    """What a code cell printed to stdout."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.get("name") == "stdout")


def cell_with(cells: list[Any], snippet: str) -> Any:
    """The one code cell whose source contains `snippet`."""
    (cell,) = [c for c in cells if snippet in c.source]
    return cell


def check_real_png(data: bytes, what: str) -> tuple[int, int]:
    """Assert `data` is a complete, non-blank PNG; return its (width, height)."""
    assert data.startswith(PNG_SIGNATURE), f"{what}: not a PNG"
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        low, high = image.convert("L").getextrema()
        size = image.size
    assert high - low > 50, f"{what}: a blank image"
    assert min(size) >= 80, f"{what}: only {size} pixels"
    return size


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert all(name in code[0].source for name in ("PER_CLASS", "EPOCHS", "TEST_LIMIT", "OUT"))


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Path]:
    """The notebook run once on 10 images per class and 200 test images: (its code cells, the run folder)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST files not in {DEBIAN_FASHION_MNIST} (apt install dataset-fashion-mnist)")
    tmp_path = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    out = tmp_path / "nb"
    first.source = (f"PER_CLASS = 10\nEPOCHS = 1\nTEST_LIMIT = {TEST_LIMIT}\nOUT = {str(out)!r}\n"
                    "OVERRIDES = ['data.num_workers=0', 'data.image_size=48']\n")
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    (run,) = [path for path in (out / "runs").iterdir() if path.is_dir()]
    return code, run


def test_notebook_shows_each_promised_figure_from_the_run_folder(executed: tuple[list[Any], Path]):
    code, run = executed
    shown = [png for cell in code for png in shown_pngs(cell)]
    files = {}
    for name, what in PROMISED_FIGURES.items():
        path = run / name
        assert path.is_file(), f"{what}: {name} not written in the run folder"
        files[name] = path.read_bytes()
        check_real_png(files[name], what)
        # Image(filename=...) embeds the file as is: the displayed bytes are the file's bytes.
        displayed = files[name] in shown  # a bool, so a failure does not print megabytes of PNG
        assert displayed, f"{what}: {name} is not displayed by the notebook"
    assert len(set(files.values())) == len(files), "each figure is its own image (one display cannot match two)"


def test_notebook_shows_one_training_image_per_class(executed: tuple[list[Any], Path]):
    code, _ = executed
    (grid,) = shown_pngs(cell_with(code, "export.train_dir"))
    width, height = check_real_png(grid, "training images, one per class")
    assert width > 3 * height, "one row of ten class images"


def test_notebook_reports_where_it_fails(executed: tuple[list[Any], Path]):
    code, run = executed
    text = printed(cell_with(code, "most_confused"))
    assert "most confused (true, predicted, count):" in text
    assert (run / "eval" / "most_confused.csv").is_file()


def test_notebook_writes_and_scores_a_submission(executed: tuple[list[Any], Path]):
    code, run = executed
    submission = run / "predictions" / "submission.csv"
    with submission.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Id", "Category"] and len(rows) == 1 + TEST_LIMIT
    text = printed(cell_with(code, "score_csv("))
    assert repr(submission.read_text().splitlines()[:4]) in text, "the submission preview shows its first rows"
    score = json.loads((run / "test_eval" / "score.json").read_text())
    assert score["images"] == TEST_LIMIT
    found = re.search(r"test accuracy ([0-9.]+) on (\d+) images", text)
    assert found, text
    assert float(found.group(1)) == pytest.approx(score["accuracy"], abs=1e-4) and int(found.group(2)) == TEST_LIMIT
