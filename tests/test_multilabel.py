"""Several labels per image: manifests, the split, the loss and thresholds, training, predict and score."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COLOURS, QUICK_CPU, TINY_OVERRIDES
from finetune import evaluate, train
from finetune.cli import main
from finetune.config.options import InferenceOptions
from finetune.data.multilabel import (MultiHotMixer, multi_hot, multilabel_split, read_multilabel_manifest,
                                      split_labels)
from finetune.data.sources import Sample
from finetune.engine.checkpoint import read_checkpoint
from finetune.engine.multilabel import BinaryLoss, best_thresholds, mean_average_precision, sample_f1
from finetune.errors import FinetuneError
from finetune.config.recipe import DataConfig, load_recipe

NAMES = list(COLOURS)  # red, green, blue


def colour_mosaic(labels: list[str], seed: int, size: int = 32) -> "Image.Image":
    """Four quadrants, each one of `labels`' colours (black when none): the labels are the colours present."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.normal(20, 10, size=(size, size, 3))
    half = size // 2
    cells = [(0, 0), (0, half), (half, 0), (half, half)]
    for k, (y, x) in enumerate(cells):
        if labels:
            array[y: y + half, x: x + half] = np.array(COLOURS[labels[k % len(labels)]]) + rng.normal(0, 20, (half, half, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def label_sets(count: int, seed: int) -> list[list[str]]:
    """Seeded label sets: every non-empty subset of the colours in turn, and now and then none."""
    rng = np.random.default_rng(seed)
    sets = []
    for i in range(count):
        if i % 9 == 8:
            sets.append([])
        else:
            chosen = [n for n in NAMES if rng.random() < 0.5] or [NAMES[i % 3]]
            sets.append(chosen)
    return sets


def write_multilabel_dataset(root: Path, count: int = 36, test: int = 8, sep: str = " ") -> Path:
    """root/images/*.png + root/labels.csv (image_name,tags), root/test/*.png + root/test_truth.csv (Id,Tags)."""
    for folder, manifest, header, n, seed in ((root / "images", root / "labels.csv", ["image_name", "tags"], count, 0),
                                              (root / "test", root / "test_truth.csv", ["Id", "Tags"], test, 1)):
        folder.mkdir(parents=True)
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for i, labels in enumerate(label_sets(n, seed)):
                colour_mosaic(labels, seed * 1000 + i).save(folder / f"{i + 1:04d}.png")
                writer.writerow([f"{i + 1:04d}", sep.join(labels)])
    return root


def _cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(root=str(root), task="multilabel", layout="csv", csv="labels.csv", csv_image_dir="images",
                      **kwargs)


def _write_manifest(root: Path, rows: list[list[str]]) -> None:
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize("sep", [" ", ",", "|"])
def test_manifest_tags_with_any_separator_and_rows_without_labels(tmp_path, sep):
    root = write_multilabel_dataset(tmp_path / "d", count=12, test=1, sep=sep)
    classes, samples, skipped = read_multilabel_manifest(_cfg(root), root)
    assert classes == sorted(NAMES) and not skipped and len(samples) == 12
    truth = label_sets(12, 0)
    for sample, labels in zip(sorted(samples, key=lambda s: s.path.name), truth):
        assert [classes[k] for k in sample.target] == sorted(labels)
    assert any(s.target == () for s in samples)  # an image with no label is kept: all negatives
    assert split_labels("clear  primary,road|water") == ["clear", "primary", "road", "water"]
    assert split_labels("sea lion;dog", ";") == ["sea lion", "dog"]


def test_manifest_with_one_binary_column_per_class(tmp_path):
    root = write_multilabel_dataset(tmp_path / "d", count=6, test=1)
    _write_manifest(root, [["image_name", "blue", "red", "green"], ["0001", "1", "0", "1"], ["0002", "0", "0", "0"],
                           ["0003", "0", "1", "0"], ["0004", "1", "1", "1"]])
    classes, samples, _ = read_multilabel_manifest(_cfg(root), root)
    assert classes == ["blue", "red", "green"]  # the columns' order
    assert [s.target for s in sorted(samples, key=lambda s: s.path.name)] == [(0, 2), (), (1,), (0, 1, 2)]


def test_manifest_errors_and_the_single_label_task_names_data_task(tmp_path):
    root = write_multilabel_dataset(tmp_path / "d", count=12, test=1)
    with pytest.raises(FinetuneError, match="data.task: multilabel"):
        main_recipe = load_recipe(None, ["data.layout=csv", "data.csv=labels.csv", "data.csv_image_dir=images",
                                         f"data.root={root}"])
        from finetune.workflows.opening import prepare_data as prepare

        prepare(main_recipe, log=lambda _: None)
    _write_manifest(root, [["image_name", "tags"], ["0001", "red"], ["0001", "blue"]])
    with pytest.raises(FinetuneError, match="listed twice"):
        read_multilabel_manifest(_cfg(root), root)
    with pytest.raises(FinetuneError, match="not among the classes"):
        _write_manifest(root, [["image_name", "tags"], ["0001", "red purple"]])
        read_multilabel_manifest(_cfg(root), root, classes=NAMES)
    with pytest.raises(FinetuneError, match="data.layout"):
        DataConfig(task="multilabel", layout="folder")
    with pytest.raises(FinetuneError, match="val_map"):
        load_recipe(None, ["train.monitor=val_map"])


def test_split_keeps_every_label_with_two_images_on_both_sides():
    rng = np.random.default_rng(3)
    samples = []
    for i in range(60):
        labels = {int(k) for k in np.flatnonzero(rng.random(8) < [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0])}
        samples.append(Sample(Path(f"{i}.png"), tuple(sorted(labels))))
    samples += [Sample(Path("rare1.png"), (6,)), Sample(Path("rare2.png"), (6, 0)),
                Sample(Path("single.png"), (7,))]
    train, val = multilabel_split(samples, 0.2, seed=0, num_classes=8)
    assert len(train) + len(val) == len(samples) and not {s.path for s in train} & {s.path for s in val}
    assert 9 <= len(val) <= 17
    counts = multi_hot(samples, 8).sum(0)
    in_train, in_val = multi_hot(train, 8).sum(0), multi_hot(val, 8).sum(0)
    for label in range(8):
        if counts[label] >= 2:
            assert in_train[label] >= 1 and in_val[label] >= 1, label
    assert in_train[7] == 1  # a label on one image trains
    assert multilabel_split(samples, 0.2, 0, 8) == (train, val)  # seeded


def test_loss_thresholds_metrics_and_mixing():
    logits, targets = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    plain = BinaryLoss()(logits, targets)
    assert torch.isclose(plain, torch.tensor(np.log(2), dtype=torch.float32))
    smoothed = BinaryLoss(0.2)(torch.tensor([[9.0, -9.0, 9.0]]), torch.tensor([[1.0, 0.0, 1.0]]))
    assert smoothed > BinaryLoss()(torch.tensor([[9.0, -9.0, 9.0]]), torch.tensor([[1.0, 0.0, 1.0]]))
    weighted = BinaryLoss(pos_weight=torch.tensor([3.0, 1.0, 1.0]))(logits, targets)
    assert weighted > plain

    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[0.3, 0.1], [0.25, 0.2], [0.1, 0.9], [0.2, 0.3]])
    cuts = best_thresholds(truth, probs)
    assert 0.2 < cuts[0] < 0.25 and 0.3 < cuts[1] < 0.9  # both classes then perfectly separated
    assert ((probs >= cuts) == truth).all()
    assert mean_average_precision(truth, probs)[0] == pytest.approx(1.0)
    assert sample_f1(np.array([[1, 1, 0], [0, 0, 0]]), np.array([[1, 0, 0], [0, 0, 0]])).tolist() == \
        pytest.approx([2 / 3, 1.0])

    torch.manual_seed(0)
    images, hot = torch.rand(4, 3, 32, 32), torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])
    for mixer in (MultiHotMixer(mixup=0.4), MultiHotMixer(cutmix=1.0)):
        shares = []
        for _ in range(5):
            mixed, soft = mixer(images, hot)
            lam = float(soft[0, 0])  # row 0 ([1, 0]) mixes with row 3 ([0, 0]): its first target is its own share
            shares.append(lam)
            assert torch.allclose(soft, lam * hot + (1 - lam) * hot.roll(1, 0))
            if mixer.ops == ["mixup"]:
                assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0))
            else:  # cutmix: the share of pixels each image kept
                kept = (mixed == images).all(1).float().mean((1, 2))
                assert torch.allclose(kept, torch.full((4,), lam), atol=1e-6)
        assert any(0 < share < 1 for share in shares)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_train_predict_evaluate_and_score_end_to_end(tmp_path, one_torch_thread, capsys):
    root = write_multilabel_dataset(tmp_path / "colours", count=36, test=8)
    runs = tmp_path / "runs"
    overrides = [*TINY_OVERRIDES, "train.epochs=3", f"output={runs}", "data.task=multilabel", "data.layout=csv",
                 "data.csv=labels.csv", "data.csv_image_dir=images", "train.monitor=val_map", "data.balance=loss",
                 "train.label_smoothing=0.1", "augment.mixup=0.2", "name=tags"]
    args = ["train", QUICK_CPU, "--data", str(root)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    run = runs / "tags"
    history = _rows(run / "history.csv")
    assert {"val_map", "val_f1"} <= set(history[0]) and len(history) == 4
    best = read_checkpoint(run / "best.pt")
    assert len(best["thresholds"]) == 3 and all(0 < t < 1 for t in best["thresholds"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and 0 <= metrics["map"] <= 1 and "samples_f1" in metrics
    assert set(metrics["thresholds"]) == set(NAMES)
    for name in ("multilabel_confusion.png", "pr_curves.png", "label_errors.csv", "thresholds.csv",
                 "predictions.csv", "classification_report.json"):
        assert (run / "eval" / name).is_file(), name
    page = (run / "report.html").read_text()
    assert "Per-label results" in page and "mAP" in page

    out = tmp_path / "tags.csv"
    assert main(["predict", str(run / "best.pt"), "--images", str(root / "test"), "--out", str(out), "--probs",
                 "--workers", "0"]) == 0
    rows = _rows(out)
    assert rows[0] == ["Id", "Tags"] and [r[0] for r in rows[1:]] == [f"{i:04d}" for i in range(1, 9)]
    assert all(set(r[1].split()) <= set(NAMES) for r in rows[1:])
    probs = _rows(tmp_path / "tags_probs.csv")
    assert probs[0] == ["Id", *sorted(NAMES)] and len(probs) == 9
    # the stored thresholds decide: a label is written exactly when its probability reaches its threshold
    for row, prob in zip(rows[1:], probs[1:]):
        expected = {c for c, p, t in zip(probs[0][1:], map(float, prob[1:]), best["thresholds"]) if p >= t}
        assert set(row[1].split()) == expected

    everything = tmp_path / "all.csv"
    sample = tmp_path / "sample.csv"
    sample.write_text("image_name,labels\n" + "".join(f"{i:04d},x\n" for i in (3, 1, 2, 4, 5, 6, 7, 8)))
    assert main(["predict", str(run / "best.pt"), "--images", str(root / "test"), "--out", str(everything),
                 "--threshold", "0.000001", "--label-sep", "|", "--sample-submission", str(sample),
                 "--workers", "0"]) == 0
    rows = _rows(everything)
    assert rows[0] == ["image_name", "labels"] and rows[1][0] == "0003"
    assert all(r[1] == "blue|green|red" for r in rows[1:])

    assert main(["evaluate", str(run / "best.pt"), "--data", str(root / "labels.csv"), "--out",
                 str(tmp_path / "ev"), "--workers", "0"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["images"] == 36

    assert main(["score", str(out), "--truth", str(root / "test_truth.csv"), "--multilabel"]) == 0
    score = json.loads((tmp_path / "tags_score" / "score.json").read_text())
    assert 0 <= score["samples_f1"] <= 1 and score["images"] == 8
    assert main(["score", str(root / "test_truth.csv"), "--truth", str(root / "test_truth.csv"), "--multilabel",
                 "--out", str(tmp_path / "self")]) == 0
    assert json.loads((tmp_path / "self" / "score.json").read_text())["samples_f1"] == 1.0
    assert "mean F1 per image 1.0000" in capsys.readouterr().out


def test_score_is_the_mean_f1_per_image(tmp_path):
    from finetune.outputs.multilabel_submission import score_multilabel_csv

    truth, sub = tmp_path / "truth.csv", tmp_path / "sub.csv"
    truth.write_text("Id,Tags\n1,a b\n2,c\n3,\n4,a\n")
    sub.write_text("Id,Tags\n1,a\n2,c\n3,\n4,b\n")
    metrics = score_multilabel_csv(sub, truth)
    assert metrics["samples_f1"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert metrics["class_names"] == ["a", "b", "c"]
    sub.write_text("Id,Tags\n1,a\n")
    with pytest.raises(FinetuneError, match="Id for Id"):
        score_multilabel_csv(sub, truth)


def test_an_image_that_does_not_decode_is_dropped_and_listed_not_checked_up_front(tmp_path, one_torch_thread):
    root = write_multilabel_dataset(tmp_path / "colours", count=27, test=2)
    whole_jpg = tmp_path / "mosaic" / "whole.jpg"
    whole_jpg.parent.mkdir()
    colour_mosaic(["red"], 99, size=256).save(whole_jpg, quality=95)
    whole = whole_jpg.read_bytes()
    (root / "images" / "0099.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    with (root / "labels.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(["0099", "red"])
    # one batch holds every training image (no drop_last), so the damaged one is met in the first epoch
    overrides = [*TINY_OVERRIDES, "train.epochs=1", "data.batch_size=64", f"output={tmp_path / 'runs'}",
                 "data.task=multilabel", "data.layout=csv", "data.csv=labels.csv", "data.csv_image_dir=images"]
    result = train(None, data=root, overrides=overrides, log=lambda _: None)
    assert [s.path.name for s in result.skipped] == ["0099.jpg"]  # found by the loader that decoded it
    assert "0099.jpg" in (result.run_dir / "skipped_images.csv").read_text()
    out = tmp_path / "ev"
    metrics = evaluate(result.best_checkpoint, root / "labels.csv", out=out, inference=InferenceOptions(num_workers=0),
                       log=lambda _: None)
    assert metrics["images"] == 27 and "0099.jpg" in (out / "skipped_images.csv").read_text()
