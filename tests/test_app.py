"""finetune app: the page's work (decisions, top classes, Grad-CAM, bad uploads) and the page itself in headless
Chromium: upload an image, read the predicted class; a non-image gets a message on the page."""

from __future__ import annotations

import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_OVERRIDES, write_folder_dataset
from finetune import train
from finetune.cli import main
from finetune.workflows.app import AppOptions, PageWork
from finetune.inference.predict import load_model

quiet = lambda line: None  # noqa: E731
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    root = write_folder_dataset(tmp / "colours", per_class=10, val_per_class=3, test=6)
    result = train(None, data=root, overrides=TINY_OVERRIDES + ["train.epochs=3", f"output={tmp / 'runs'}"],
                   log=quiet)
    return result.best_checkpoint, tmp


def _images(tmp):
    red = tmp / "red_square.png"
    Image.new("RGB", (40, 40), (200, 40, 40)).save(red)
    fake = tmp / "not_an_image.jpg"
    fake.write_bytes(b"plain text, not a JPEG")
    big = tmp / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big)
    return red, fake, big


def test_the_page_decides_lists_top_classes_and_reports_bad_uploads(trained, tmp_path):
    checkpoint, _ = trained
    red, fake, big = _images(tmp_path)
    classify = PageWork(load_model(checkpoint), AppOptions(topk=2, max_upload_mb=0.1))
    page, overlays = classify([str(red), str(fake), str(big)])
    assert "red_square.png" in page and "red (probability" in page and page.count("<tr><td>") == 2
    assert "not_an_image.jpg: not an image this model can read" in page and str(tmp_path) not in page
    assert "big.png: larger than 0.1 MB, not read" in page
    assert len(overlays) == 1 and overlays[0][0].shape == (32, 32, 3) and "where it looked for red" in overlays[0][1]
    rejecting = PageWork(load_model(checkpoint), AppOptions(reject_below=0.999))
    assert "unknown: the top class, red, has probability" in rejecting([str(red)])[0]
    assert "Pick or drop" in classify([])[0]


def test_app_refuses_bad_options_in_one_line(trained, capsys):
    checkpoint, _ = trained
    assert main(["app", str(checkpoint), "--reject-below", "2"]) == 2
    assert "--reject-below must be between 0 and 1" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (Debian: apt-get install chromium-driver)")
def test_app_answers_an_upload_in_headless_chromium(trained, tmp_path):
    pytest.importorskip("gradio", reason="the app needs the [app] extra")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from finetune.workflows.app import build_app

    checkpoint, _ = trained
    red, fake, _ = _images(tmp_path)
    port = _free_port()
    page = build_app(checkpoint)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "input[type=file]"))
        upload.send_keys(f"{red}\n{fake}")
        time.sleep(2)  # the upload finishes before the click
        wait.until(lambda b: b.find_element(By.XPATH, "//button[contains(., 'Classify')]")).click()
        results = wait.until(lambda b: b.find_element(By.ID, "finetune-results"))
        wait.until(lambda b: "red_square.png" in results.text)
        assert "red (probability" in results.text
        assert "not_an_image.jpg: not an image this model can read" in results.text
        browser.save_screenshot(str(tmp_path / "app.png"))
    finally:
        browser.quit()
        page.close()


def test_a_multi_label_checkpoint_shows_its_label_set_and_thresholds(tmp_path):
    from untrained import untrained_checkpoint

    checkpoint = untrained_checkpoint(tmp_path / "run" / "best.pt", ["cat", "dog", "sky"],
                                      overrides=["data.task=multilabel", "data.layout=csv", "data.csv=tags.csv"])
    red, _, _ = _images(tmp_path)
    classify = PageWork(load_model(checkpoint), AppOptions())
    page, _ = classify([str(red)])
    assert "labels: " in page or "no label: every class is below its threshold" in page
    assert "each at its own threshold: cat 0.50, dog 0.50, sky 0.50" in classify.describe()
