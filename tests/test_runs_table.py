"""`finetune runs`: one line per run, the recipe key that differs, best metric, status; CSV and HTML."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from finetune.workflows.api import train
from finetune.cli import main
from tests.conftest import QUICK_CPU

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def three_runs(folder_dataset: Path, tiny_overrides: list[str]) -> Path:
    """Three one-epoch runs that differ only in train.lr, and an interrupted copy of the last."""
    for lr in ("0.03", "0.003", "0.0003"):
        result = train(QUICK_CPU, data=folder_dataset, log=lambda _: None,
                       overrides=tiny_overrides + ["train.epochs=1", "train.warmup_epochs=0", f"train.lr={lr}"])
    root = result.run_dir.parent
    crashed = shutil.copytree(result.run_dir, root / "crashed")
    shutil.rmtree(crashed / "eval")  # it stopped before evaluating: its last.pt can be resumed
    return root


def test_the_runs_table_shows_the_key_that_differs_and_each_runs_state(
        three_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_csv, out_html = tmp_path / "runs.csv", tmp_path / "runs.html"
    assert main(["runs", str(three_runs), "--sort", "train.lr", "--csv", str(out_csv), "--html", str(out_html)]) == 0
    printed = capsys.readouterr().out
    assert "train.lr" in printed and "train.epochs" not in printed and "data.image_size" not in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0])[:3] == ["run", "backbone", "train.lr"]
    assert [float(r["train.lr"]) for r in rows] == [0.03, 0.003, 0.0003, 0.0003]  # numbers high to low
    status = {r["run"]: r["status"] for r in rows}
    assert status.pop("crashed") == "interrupted (resumable)"
    assert set(status.values()) == {"finished"}
    assert all(r["best epoch"] == "1" and r["epochs"] == "1/1" and 0 <= float(r["best val_acc"]) <= 1 for r in rows)
    page = out_html.read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") == 1 and "crashed" in page


def test_runs_says_what_to_do_when_there_is_nothing_or_the_column_is_unknown(
        three_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert main(["runs", str(three_runs), "--sort", "colour"]) == 2
    err = capsys.readouterr().err
    assert "no runs folder" in err and "--sort colour: no such column" in err
