"""report.html: self-contained, rebuilt by `finetune report`, and it renders in a real browser."""

from __future__ import annotations

import base64
import io
import re
import subprocess

import pytest
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS, COLOURS, PROBE, TINY_OVERRIDES, make_image, write_folder_dataset
from finetune import FinetuneError, train
from finetune.cli import main
from finetune.workflows.api import report

quiet = lambda line: None  # noqa: E731



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = write_folder_dataset(tmp / "shapes", per_class=10, val_per_class=3, test=3)
    make_image(COLOURS["red"], 901).save(root / "val" / "green" / "wrong.jpg")
    (root / "train" / "blue" / "broken.jpg").write_bytes(b"")
    overrides = TINY_OVERRIDES + [f"output={tmp / 'runs'}", "train.epochs=1"]
    return train(None, data=root, overrides=overrides, log=quiet).run_dir


def test_report_is_self_contained_with_every_figure_embedded(run):
    page = (run / "report.html").read_text()
    for heading in ("Confusion matrix", "Per-class results", "Misclassified", "Grad-CAM", "Calibration",
                    "Training curves", "Data", "Recipe", "Accuracy against coverage"):
        assert f">{heading}" in page, heading
    sources = re.findall(r'<img src="([^"]+)"', page)
    # confusion matrix, most-confused pairs, per-class recall, gallery, Grad-CAM, reliability diagram,
    # accuracy against coverage, curves
    assert len(sources) == 8
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.width > 100
    assert not re.search(r'(src|href)="(https?:|//)', page)  # nothing fetched from a server
    assert "broken.jpg" in page  # the skipped image is listed
    assert "backbone test_resnet" in page


def test_report_command_rebuilds_and_rejects_other_folders(run, tmp_path, capsys):
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="run folder not found"):
        report(tmp_path / "missing")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    page = (run / "report.html").read_text()
    probe = run / "report_probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    try:
        dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=90).stdout
        shot = run / "report_screenshot.png"
        subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={shot}", (run / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=90, cwd=tmp_path)
    finally:
        probe.unlink()
    assert 'data-loaded="yes"' in dom
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == page.count("<img ") >= 5 and min(widths) > 100, widths  # every embedded PNG decoded
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").resize((320, 600)).getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # a rendered page, not a blank canvas
