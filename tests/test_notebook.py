"""The quickstart notebook runs top to bottom on a reduced size and is stored without outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from finetune.datasets import DEBIAN_FASHION_MNIST

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert all(name in code[0].source for name in ("PER_CLASS", "EPOCHS", "TEST_LIMIT", "OUT"))


def test_notebook_runs_on_a_reduced_size(tmp_path: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST files not in {DEBIAN_FASHION_MNIST} (apt install dataset-fashion-mnist)")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    out = tmp_path / "nb"
    first.source = (f"PER_CLASS = 10\nEPOCHS = 1\nTEST_LIMIT = 200\nOUT = {str(out)!r}\n"
                    "OVERRIDES = ['data.num_workers=0', 'data.image_size=48']\n")
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "plots and confusion matrices shown inline"
    (submission,) = out.glob("runs/*/predictions/submission.csv")
    with submission.open() as handle:
        assert len(list(csv.DictReader(handle))) == 200
