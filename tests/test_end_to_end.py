"""The whole path a user walks: CLI train → evaluate → predict, plus freezing and CLI errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK_CPU, REPO, TINY_OVERRIDES, make_image, write_folder_dataset
from finetune import load_model
from finetune.cli import main
from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.sources import discover
from finetune.data.transforms import build_train_transform
from finetune.engine.fit import OptimState, TrainingParts, train_one_epoch
from finetune.models import build_model
from finetune.config.recipe import load_recipe
from finetune.tasks.single_label import SingleLabelScorer


def cli_overrides(tmp_path: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = []
    for item in TINY_OVERRIDES + [f"output={tmp_path / 'runs'}", *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained_hw03(tmp_path_factory):
    """One real 2-epoch CLI run on the HW03 layout, shared by the tests below."""
    from conftest import write_hw03_dataset

    tmp = tmp_path_factory.mktemp("e2e")
    root = write_hw03_dataset(tmp / "food", per_class=16, val_per_class=6, test=12)
    code = main(["train", QUICK_CPU, "--data", str(root), *cli_overrides(tmp, ("name=hw03",))])
    assert code == 0
    return root, tmp / "runs" / "hw03"


def test_train_writes_a_complete_run_folder(trained_hw03):
    root, run = trained_hw03
    for name in ("recipe.yaml", "history.csv", "best.pt", "last.pt", "curves.png", "classes.txt",
                 "class_counts.csv", "skipped_images.csv", "eval/confusion_matrix.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    # Easy three-class colour data: two epochs must clearly beat chance (1/3).
    assert max(float(r["val_acc"]) for r in rows) >= 0.8
    recipe = load_recipe(run / "recipe.yaml")
    assert recipe.data.root == str(root.resolve()) and recipe.model.backbone == "test_resnet"


def test_checkpoint_is_self_contained(trained_hw03):
    _, run = trained_hw03
    loaded = load_model(run / "best.pt")
    assert loaded.classes == ["0", "1", "2"]
    assert loaded.preprocessing.size == 32
    assert set(loaded.checkpoint["versions"]) == {"finetune", "torch", "torchvision", "timm"}
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_second_run_never_overwrites_the_first(trained_hw03, tmp_path):
    root, run = trained_hw03
    overrides = cli_overrides(run.parent.parent, ("name=hw03", "train.epochs=1", "train.warmup_epochs=0"))
    assert main(["train", QUICK_CPU, "--data", str(root), *overrides]) == 0
    assert (run.parent / "hw03-2" / "best.pt").is_file()
    assert len(list(csv.DictReader((run / "history.csv").open()))) == 2


def test_evaluate_writes_the_bundle(trained_hw03, tmp_path):
    root, run = trained_hw03
    out = tmp_path / "eval"
    assert main(["evaluate", str(run / "best.pt"), "--data", str(root / "validation"), "--out", str(out),
                 "--workers", "0"]) == 0
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "classification_report.json", "most_confused.csv"):
        assert (out / name).is_file(), name
    report = json.loads((out / "classification_report.json").read_text())
    assert set(report) >= {"0", "1", "2", "macro avg", "accuracy"}
    matrix = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert matrix[0] == ["true\\predicted", "0", "1", "2"]
    assert sum(int(v) for row in matrix[1:] for v in row[1:]) == 18


def test_predict_writes_one_row_per_image_with_string_ids(trained_hw03, tmp_path):
    root, run = trained_hw03
    (root / "test" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "submission.csv"
    assert main(["predict", str(run / "best.pt"), "--images", str(root / "test"), "--out", str(out),
                 "--workers", "0"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["Id", "Category"]
    ids = [r[0] for r in rows[1:]]
    assert ids[:3] == ["0001", "0002", "0003"] and "broken" in ids and len(ids) == 13
    assert ids == sorted(ids)
    assert (tmp_path / "submission_unreadable.csv").is_file()
    # Colour i % 3 was written to test image i+1: the model should mostly get them right.
    truth = {f"{i + 1:04d}": str(i % 3) for i in range(12)}
    correct = sum(truth[i] == c for i, c in rows[1:] if i in truth)
    assert correct >= 9
    custom = tmp_path / "custom.csv"
    assert main(["predict", str(run / "best.pt"), "--images", str(root / "test"), "--out", str(custom),
                 "--id-column", "image", "--label-column", "label", "--value", "index", "--workers", "0"]) == 0
    assert next(csv.reader(custom.open())) == ["image", "label"]


def test_checkpoint_with_other_classes_is_refused(trained_hw03, tmp_path, capsys):
    _, run = trained_hw03
    other = write_folder_dataset(tmp_path / "colours")
    assert main(["evaluate", str(run / "best.pt"), "--data", str(other / "val")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not know" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", QUICK_CPU, "--data", "/no/such/folder"], "dataset folder not found"),
        (["train", QUICK_CPU, "--data", "/no/such", "--set", "model.backbone=resnet_does_not_exist"],
         "unknown backbone"),
        (["train", QUICK_CPU, "--set", "train.epocs=3"], "unknown recipe key 'train.epocs'"),
        (["train", QUICK_CPU, "--set", "data.batch_size=many"], "'data.batch_size' must be int"),
        (["predict", "missing.pt", "--images", "."], "checkpoint not found"),
        (["predict", str(REPO / "pyproject.toml"), "--images", "."], "not a readable checkpoint"),
    ],
)
def test_cli_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_stage_lists_valid_ones(capsys):
    assert main(["inspect", "test_resnet", "--trainable", "layer9"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'layer9'" in err and "layer4" in err


def test_freezing_keeps_frozen_weights_and_bn_statistics(tmp_path):
    """After real training steps: frozen parameters and BN statistics are unchanged; layer4 and head moved."""
    root = write_folder_dataset(tmp_path / "d")
    recipe = load_recipe(None, TINY_OVERRIDES + [f"data.root={root}", "model.trainable=[layer4]",
                                                 "model.head.hidden=[16]"])
    splits = discover(recipe.data)
    model, pre = build_model(recipe.model, 3, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(ImageDataset(splits.train, build_train_transform(pre, "light")), 8, 0, shuffle=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    parts = TrainingParts(loader, loader, torch.nn.CrossEntropyLoss(), SingleLabelScorer())
    train_one_epoch(model, parts, OptimState(optimizer, scheduler), torch.device("cpu"), recipe.train, "test")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = {k for k in before if not k.startswith(("backbone.layer4.", "head."))}
    assert not (changed & frozen), sorted(changed & frozen)[:5]
    assert any(k.startswith("backbone.layer4.") and "running_mean" in k for k in changed)
    assert any(k.startswith("backbone.layer4.") and k.endswith("weight") for k in changed)
    assert any(k.startswith("head.") for k in changed)


def test_grayscale_and_rgba_training_images_train_fine(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=6, val_per_class=2, test=1)
    make_image((200, 40, 40), 99).convert("L").save(root / "train" / "red" / "gray.png")
    make_image((200, 40, 40), 98).convert("RGBA").save(root / "train" / "red" / "alpha.PNG")
    (root / "train" / "red" / "corrupt.jpg").write_bytes(b"garbage")
    import finetune

    result = finetune.train(None, data=root, overrides=TINY_OVERRIDES + [f"output={tmp_path}", "train.epochs=1", "train.warmup_epochs=0"],
                            log=lambda _: None)
    assert [s.path.name for s in result.skipped] == ["corrupt.jpg"]
    skipped = list(csv.DictReader((result.run_dir / "skipped_images.csv").open()))
    assert len(skipped) == 1 and skipped[0]["path"].endswith("corrupt.jpg")
