"""The evaluation bundle (top-k, calibration, misclassified gallery, Grad-CAM) and `finetune score`."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import COLOURS, TINY_OVERRIDES, make_image, write_folder_dataset
from finetune import FinetuneError, evaluate, load_model, train
from finetune.cli import main
from finetune.config.options import InferenceOptions
from finetune.data.prepare import labelled
from finetune.data.preprocessing import Preprocessing
from finetune.outputs.evaluation import top_k_accuracies, write_evaluation
from finetune.outputs.run_dir import EvalFiles
from finetune.inference.gradcam import grad_cam
from finetune.inference.predict import LoadedModel
from finetune.models import Classifier
from finetune.config.recipe import Recipe
from finetune.outputs.figures.calibration import calibration_bins
from finetune.outputs.figures.gallery import worst_mistakes
from finetune.outputs.scoring import score_csv
from untrained import untrained_checkpoint

quiet = lambda line: None  # noqa: E731


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run whose validation folder holds three deliberately mislabelled images."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root = write_folder_dataset(tmp / "shapes", per_class=10, val_per_class=3, test=3)
    for i, (looks, filed_as) in enumerate([("red", "green"), ("blue", "red"), ("green", "blue")]):
        make_image(COLOURS[looks], 900 + i).save(root / "val" / filed_as / f"wrong_{i}.jpg")
    overrides = TINY_OVERRIDES + [f"output={tmp / 'runs'}", "train.epochs=1"]
    return root, train(None, data=root, overrides=overrides, log=quiet)


def test_training_writes_the_full_bundle_with_gallery_and_gradcam(run):
    _, result = run
    eval_dir = result.run_dir / "eval"
    for name in ("confusion_matrix.png", "metrics.json", "reliability.png", "misclassified.png", "gradcam.png",
                 "predictions.csv"):
        assert (eval_dir / name).is_file(), name
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["images"] == 12 and metrics["classes"] == 3
    assert metrics["top_k"] == {"top1": pytest.approx(metrics["accuracy"])}  # 3 classes: top-3 would be trivial
    assert metrics["accuracy"] <= 0.75  # the three mislabelled images cannot be right
    assert 0.0 <= metrics["ece"] <= 1.0 and sum(metrics["calibration_bins"]["counts"]) == 12
    assert metrics["gradcam"] is True
    with Image.open(eval_dir / "misclassified.png") as image:
        assert image.width > 300 and image.height > 150


def test_evaluate_with_tta_rebuilds_the_run_report(run, tmp_path):
    root, result = run
    (result.run_dir / "report.html").unlink()
    metrics = evaluate(result.best_checkpoint, root / "val", inference=InferenceOptions(num_workers=0, tta="flip"),
                       log=quiet)
    assert (result.run_dir / "report.html").is_file()
    assert metrics["images"] == 12
    out = tmp_path / "elsewhere"
    assert main(["evaluate", str(result.best_checkpoint), "--data", str(root / "val"), "--out", str(out),
                 "--workers", "0", "--tta", "crops"]) == 0
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()


def test_evaluate_decodes_once_and_lists_images_that_fail_to_decode(run, tmp_path):
    root, result = run
    data = tmp_path / "val"
    shutil.copytree(root / "val", data)
    make_image(COLOURS["red"], 950, size=256).save(data / "red" / "whole.jpg", quality=95)
    whole = (data / "red" / "whole.jpg").read_bytes()
    (data / "red" / "whole.jpg").unlink()
    (data / "red" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    (data / "blue" / "notes.png").write_text("not an image")
    samples, skipped = labelled(data, result.classes, "auto", "")
    assert "truncated.jpg" in {s.path.name for s in samples}  # only headers are read before scoring
    assert [s.path.name for s in skipped] == ["notes.png"]
    out = tmp_path / "eval"
    metrics = evaluate(result.best_checkpoint, data, out=out, inference=InferenceOptions(num_workers=0), log=quiet)
    assert metrics["images"] == 12  # the truncated image is left out of the metrics, not scored as a blank
    listed = (out / "skipped_images.csv").read_text()
    assert "truncated.jpg" in listed and "notes.png" in listed


def test_top_k_accuracy_counts_the_true_class_among_the_k_likeliest():
    probs = np.array([
        [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # true 0: top-1 hit
        [0.50, 0.20, 0.15, 0.10, 0.03, 0.02],  # true 2: third → top-3 hit
        [0.50, 0.20, 0.15, 0.10, 0.03, 0.02],  # true 4: fifth → top-5 hit
        [0.50, 0.20, 0.15, 0.10, 0.03, 0.02],  # true 5: sixth → miss everywhere
    ])
    assert top_k_accuracies([0, 2, 4, 5], probs) == {"top1": 0.25, "top3": 0.5, "top5": 0.75}
    assert set(top_k_accuracies([0, 1], probs[:2, :4] / probs[:2, :4].sum(1, keepdims=True))) == {"top1", "top3"}


def test_ece_is_zero_when_confidence_matches_accuracy_and_measures_the_gap():
    probs = np.tile([0.9, 0.1], (10, 1))
    nine_right = [0] * 9 + [1]
    assert calibration_bins(probs, nine_right).ece == pytest.approx(0.0, abs=1e-9)
    half_right = [0] * 5 + [1] * 5
    assert calibration_bins(probs, half_right).ece == pytest.approx(0.4)
    mixed = np.array([[0.9, 0.1]] * 5 + [[0.6, 0.4]] * 5)
    # Bin 0.9: accuracy 1.0 (gap 0.1); bin 0.6: accuracy 0.4 (gap 0.2); equal weights.
    assert calibration_bins(mixed, [0] * 5 + [0, 0, 1, 1, 1]).ece == pytest.approx(0.15)


def test_worst_mistakes_are_the_most_confident_wrong_answers():
    assert worst_mistakes([0, 1, 2, 0, 1], [0, 2, 1, 1, 1], [0.99, 0.6, 0.9, 0.7, 0.95], limit=2) == [2, 3]


class _TopLeftOnly(nn.Module):
    """Zeroes everything outside the top-left quadrant of the feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x)
        mask[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1
        return x * mask


def test_grad_cam_highlights_the_region_the_score_depends_on(tmp_path):
    conv = nn.Conv2d(3, 4, 1)
    nn.init.constant_(conv.weight, 1.0)
    nn.init.zeros_(conv.bias)
    body = nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU(), mask=_TopLeftOnly(),
                                     pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
    model = Classifier(body, head, {"body": ["conv"]})
    for p in model.parameters():
        p.requires_grad_(False)  # a fully frozen backbone must still give a map
    pre = Preprocessing(size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
    loaded = LoadedModel(model, ["a", "b"], pre, Recipe(), {})
    path = tmp_path / "white.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(path)
    (cam,) = grad_cam(loaded, [path], [0])
    assert cam.layer == "mask" and cam.heat.shape == (16, 16) and cam.image.shape == (16, 16, 3)
    assert cam.heat[:6, :6].min() > 0.9  # the quadrant the score depends on
    assert cam.heat[10:, :].max() < 0.05 and cam.heat[:, 10:].max() < 0.05


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "Id,Category") -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def test_score_matches_by_id_and_writes_the_bundle(tmp_path):
    truth = _csv(tmp_path / "truth.csv", [("0001", "cat"), ("0002", "dog"), ("0003", "cat"), ("0004", "bird")])
    submission = _csv(tmp_path / "sub.csv", [("0004", "bird"), ("0003", "dog"), ("0002", "dog"), ("0001", "cat")])
    metrics = score_csv(submission, truth, tmp_path / "score")
    assert metrics["accuracy"] == 0.75 and metrics["class_names"] == ["bird", "cat", "dog"]
    assert json.loads((tmp_path / "score" / "score.json").read_text())["correct"] == 3
    assert (tmp_path / "score" / "confusion_matrix.png").is_file()
    assert main(["score", str(submission), "--truth", str(truth)]) == 0
    assert (tmp_path / "sub_score" / "metrics.json").is_file()


def test_score_names_missing_and_extra_ids(tmp_path, capsys):
    truth = _csv(tmp_path / "truth.csv", [("0001", "cat"), ("0002", "dog"), ("0003", "cat")])
    with pytest.raises(FinetuneError, match=r"1 Id\(s\) have no prediction \(e.g. \['0003'\]\).*\['0009'\]"):
        score_csv(_csv(tmp_path / "a.csv", [("0001", "cat"), ("0002", "dog"), ("0009", "cat")]), truth)
    unpadded = _csv(tmp_path / "b.csv", [("1", "cat"), ("2", "dog"), ("3", "cat")])
    assert main(["score", str(unpadded), "--truth", str(truth)]) == 2
    assert "differ only in zero padding" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="lists Id '0001' twice"):
        score_csv(_csv(tmp_path / "c.csv", [("0001", "cat"), ("0001", "dog")]), truth)


def test_transformers_get_no_grad_cam_but_the_rest_of_the_bundle(tmp_path):
    loaded = load_model(untrained_checkpoint(tmp_path / "vit.pt", ["a", "b"], backbone="test_vit", size=32))
    images = []
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(COLOURS.values()):
        images.append(tmp_path / "images" / f"{i}.png")
        make_image(colour, i).save(images[-1])
    assert grad_cam(loaded, images, [0, 1, 0]) is None  # token maps: no honest Grad-CAM
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    metrics = write_evaluation([0, 0, 1], probs.argmax(1), ["a", "b"], EvalFiles(tmp_path / "eval"), probs, images,
                               model=loaded)
    assert metrics["gradcam"] is False and not (tmp_path / "eval" / "gradcam.png").exists()
    assert (tmp_path / "eval" / "misclassified.png").is_file()
