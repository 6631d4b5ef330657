"""Bad input, tried as a careless or unlucky user would: one `error:` line and exit 2, nothing lost, nothing wrong.

Every case goes through the CLI (`finetune.cli.main`): a user mistake must print exactly one line
starting with `error:` on stderr and return 2 — an uncaught exception fails the test — and must
leave no `*.tmp` file behind. The few checks below the CLI cases test the data rules directly.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, QUICK_CPU, TINY_OVERRIDES, make_image, write_folder_dataset
from finetune.cli import main
from finetune.workflows.opening import prepare_data
from finetune.data.sources import discover
from finetune.engine.checkpoint import read_checkpoint, save_checkpoint
from finetune.models.backbones import feature_dim
from finetune.config.recipe import DataConfig, load_recipe
from finetune.config.options import SubmissionOptions
from finetune.outputs.submission import SubmissionFiles, SubmissionPlan, write_rows
from untrained import untrained_checkpoint

CLASSES = sorted(COLOURS)


def settings(*extra: str) -> list[str]:
    """TINY_OVERRIDES (and `extra`) as --set options."""
    return [arg for item in (*TINY_OVERRIDES, *extra) for arg in ("--set", item)]


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI, check it refused with one `error:` line naming `fragments`; returns that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def no_leftovers(folder: Path) -> None:
    assert not list(folder.rglob("*.tmp")), list(folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A small colour data set and an untrained checkpoint in a run folder (inference plumbing only)."""
    tmp = tmp_path_factory.mktemp("bad")
    root = write_folder_dataset(tmp / "shapes", per_class=4, val_per_class=2, test=4)
    checkpoint = untrained_checkpoint(tmp / "runs" / "run" / "best.pt", CLASSES)
    return root, checkpoint, tmp


def predict_argv(kit, out: Path, *extra: str) -> list[str]:
    root, checkpoint, _ = kit
    return ["predict", str(checkpoint), "--images", str(root / "test"), "--out", str(out), "--workers", "0", *extra]


# --- item 7: tracebacks become one error line ------------------------------------------------------------


def test_malformed_set_value(capsys, kit):
    refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", "train.epochs=[1"], "train.epochs=[1",
            "not valid YAML")


def test_recipe_that_is_not_utf8(capsys, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    refused(capsys, ["train", str(recipe), "--data", str(tmp_path)], "not UTF-8")


def test_predict_out_naming_a_folder(capsys, kit, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    refused(capsys, predict_argv(kit, folder), "is a folder")
    no_leftovers(tmp_path)


def test_a_failed_rename_leaves_no_temporary_file(tmp_path):
    """Below the CLI's check: write_rows onto a folder fails on the rename and still cleans up."""
    folder = tmp_path / "taken"
    folder.mkdir()
    plan = SubmissionPlan(["1", "2"], [tmp_path / "1.jpg", tmp_path / "2.jpg"])
    with pytest.raises(OSError):
        write_rows(plan, [np.array([[0.9, 0.1], [0.2, 0.8]])], ["a", "b"], SubmissionFiles(folder, tmp_path / "p.csv"),
                   SubmissionOptions())
    no_leftovers(tmp_path)
    assert not (tmp_path / "p.csv").exists()


def test_evaluate_out_naming_a_file(capsys, kit, tmp_path):
    root, checkpoint, _ = kit
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    refused(capsys, ["evaluate", str(checkpoint), "--data", str(root / "val"), "--out", str(taken), "--workers", "0"],
            "is a file")
    assert taken.read_text() == "mine"
    no_leftovers(tmp_path)


# --- item 10: small ones -------------------------------------------------------------------------------


def test_empty_recipe_is_refused(capsys, kit, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    refused(capsys, ["train", str(empty), "--data", str(kit[0])], "is empty")


def test_a_negative_warmup_names_the_key(capsys, kit):
    # A warm-up longer than the run is no longer a conflict (issue 27: shipped recipes take any epoch count).
    refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", "train.warmup_epochs=-1"],
            "train.warmup_epochs", "0 (no warm-up) or more")


def test_byte_order_mark_in_csv_headers(capsys, tmp_path):
    truth, submission = tmp_path / "truth.csv", tmp_path / "sub.csv"
    truth.write_text("\ufeffId,Category\n1,red\n2,blue\n", encoding="utf-8")
    submission.write_text("\ufeffId,Category\n1,red\n2,red\n", encoding="utf-8")
    assert main(["score", str(submission), "--truth", str(truth), "--id-column", "Id"]) == 0
    assert "accuracy 0.5000" in capsys.readouterr().out


def test_byte_order_mark_in_a_manifest(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for k, (name, colour) in enumerate(COLOURS.items()):
        for i in range(3):
            make_image(colour, 10 * k + i).save(images / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name}")
    (tmp_path / "labels.csv").write_text("\ufeffId,Category\n" + "\n".join(rows) + "\n", encoding="utf-8")
    splits = discover(DataConfig(root=str(tmp_path), layout="csv", csv="labels.csv", csv_image_dir="images",
                                 csv_id_column="Id", val_fraction=0.34))
    assert splits.classes == CLASSES and len(splits.train) + len(splits.val) == 9


def test_unreadable_images_are_dropped_before_the_split(tmp_path):
    for name, colour in list(COLOURS.items())[:2]:
        (tmp_path / name).mkdir()
        for i in range(10):
            make_image(colour, i).save(tmp_path / name / f"{i}.png")
    for i in range(4):  # four broken files in one class
        (tmp_path / "green" / f"broken{i}.png").write_bytes(b"not an image")
    for seed in range(4):  # splitting first would give 12 minus the broken ones that landed in validation
        recipe = load_recipe(None, [f"data.root={tmp_path}", "data.val_fraction=0.5", f"train.seed={seed}"])
        prepared = prepare_data(recipe, log=lambda line: None)
        assert len(prepared.skipped) == 4
        assert len(prepared.val) == 10 and len(prepared.train) == 10  # half of the 20 usable images


# --- item 8: image size bound ------------------------------------------------------------------------------


def test_huge_image_size_is_refused_with_the_reason(capsys, kit):
    line = refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", "data.image_size=100000"],
                   "data.image_size", "2048")
    assert "too small" not in line


def test_out_of_memory_is_named():
    class Hungry(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    with pytest.raises(Exception, match="not enough memory") as info:
        feature_dim(Hungry(), 2048)
    assert "too small" not in str(info.value)


# --- item 3: divergence ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [".inf", ".nan", "0", "-0.1"])
def test_non_finite_or_non_positive_rate_is_refused(capsys, kit, lr):
    refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", f"train.lr={lr}"], "train.lr")


@pytest.mark.parametrize("batch_size, where", [(4, "epoch 1/2, batch 2/3"), (8, "epoch 1/2: the validation loss")])
def test_diverging_training_stops_naming_epoch_and_batch(capsys, kit, tmp_path, one_torch_thread, batch_size, where):
    # 12 training images: three batches of 4 (caught at the next batch), or one of 8 (caught by validation).
    line = refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]),
                            *settings(f"output={tmp_path}", "train.lr=1.0e+30", "train.warmup_epochs=0",
                                      f"data.batch_size={batch_size}")],
                   where, "lower train.lr")
    assert "nan" in line or "inf" in line
    assert not list(tmp_path.rglob("best.pt"))  # nothing saved from a diverged epoch
    no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def nan_checkpoint(kit):
    _, checkpoint, tmp = kit
    payload = read_checkpoint(checkpoint)
    state = dict(payload["model_state"])
    name = next(k for k, v in state.items() if v.is_floating_point() and "running_" not in k)
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp / "diverged" / "best.pt"
    path.parent.mkdir()
    save_checkpoint(path, {**{k: v for k, v in payload.items() if k not in ("format", "versions")},
                           "model_state": state})
    return path


def test_predict_refuses_non_finite_weights(capsys, kit, nan_checkpoint, tmp_path):
    root = kit[0]
    refused(capsys, ["predict", str(nan_checkpoint), "--images", str(root / "test"), "--out",
                     str(tmp_path / "s.csv")], "non-finite weights", "train.lr")
    assert not (tmp_path / "s.csv").exists()


def test_evaluate_refuses_non_finite_weights(capsys, kit, nan_checkpoint, tmp_path):
    refused(capsys, ["evaluate", str(nan_checkpoint), "--data", str(kit[0] / "val"), "--out", str(tmp_path / "e")],
            "non-finite weights")


def test_export_refuses_non_finite_weights(capsys, nan_checkpoint, tmp_path):
    refused(capsys, ["export", str(nan_checkpoint), "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
            "non-finite weights")
    assert not (tmp_path / "m.pt").exists()


# --- item 2: written files respect the umask ------------------------------------------------------------------


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_submission_and_checkpoint_get_a_normal_mode(capsys, kit, tmp_path, umask_022):
    out = tmp_path / "submission.csv"
    out.write_text("Id,Category\n")
    out.chmod(0o644)
    assert main(predict_argv(kit, out, "--probs", "--force")) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "submission_probs.csv").stat().st_mode & 0o777 == 0o644
    saved = tmp_path / "copy.pt"
    save_checkpoint(saved, {"model_state": {}})
    assert saved.stat().st_mode & 0o777 == 0o644
    os.umask(0o077)  # a private umask is respected too
    save_checkpoint(saved, {"model_state": {}})
    assert saved.stat().st_mode & 0o777 == 0o600


# --- item 1: outputs never overwrite inputs ---------------------------------------------------------------


def test_predict_never_writes_over_its_checkpoint(capsys, kit):
    checkpoint = kit[1]
    before = checkpoint.read_bytes()
    refused(capsys, predict_argv(kit, checkpoint), "reads that file")
    refused(capsys, predict_argv(kit, checkpoint, "--force"), "reads that file")
    assert checkpoint.read_bytes() == before
    no_leftovers(checkpoint.parent)


def test_predict_never_writes_over_an_image_it_reads(capsys, kit):
    image = kit[0] / "test" / "0001.jpg"
    before = image.read_bytes()
    refused(capsys, predict_argv(kit, image, "--force"), "reads that file")
    assert image.read_bytes() == before


def test_predict_never_writes_over_the_sample_submission(capsys, kit, tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("Id,Category\n" + "".join(f"{i:04d},red\n" for i in range(1, 5)))
    before = sample.read_text()
    refused(capsys, predict_argv(kit, sample, "--sample-submission", str(sample)), "reads that file")
    assert sample.read_text() == before


def test_predict_replaces_another_file_only_with_force(capsys, kit, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    refused(capsys, predict_argv(kit, notes), "--force")
    assert notes.read_text() == "precious"
    assert main(predict_argv(kit, notes, "--force")) == 0
    assert notes.read_text().startswith("Id,Category")


def test_predict_may_replace_its_own_earlier_submission(capsys, kit, tmp_path):
    out = tmp_path / "submission.csv"
    assert main(predict_argv(kit, out)) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main(predict_argv(kit, out)) == 0
    assert f"replaced the earlier {out}" in capsys.readouterr().out
    assert len(list(csv.reader(out.open()))) == 5


def test_export_never_writes_over_its_checkpoint(capsys, kit, tmp_path):
    checkpoint = kit[1]
    before = checkpoint.read_bytes()
    refused(capsys, ["export", str(checkpoint), "--format", "torchscript", "--out", str(checkpoint), "--force"],
            "reads that file")
    assert checkpoint.read_bytes() == before
    other = tmp_path / "other.pt"  # another checkpoint is not an earlier TorchScript export
    other.write_bytes(before)
    refused(capsys, ["export", str(checkpoint), "--format", "torchscript", "--out", str(other)], "--force")
    assert other.read_bytes() == before


def test_evaluate_never_writes_into_its_data(capsys, kit):
    root, checkpoint, _ = kit
    inside = root / "val" / "red"
    before = sorted(p.name for p in inside.iterdir())
    refused(capsys, ["evaluate", str(checkpoint), "--data", str(root / "val"), "--out", str(inside)],
            "inside the data folder")
    assert sorted(p.name for p in inside.iterdir()) == before


@pytest.mark.parametrize("command", ["augment", "lr-find"])
def test_figures_never_land_in_the_data_or_on_the_recipe(capsys, kit, tmp_path, command):
    root = kit[0]
    refused(capsys, [command, QUICK_CPU, "--data", str(root), "--out", str(root / "train" / "red" / "grid.png")],
            "inside the data folder")
    assert not (root / "train" / "red" / "grid.png").exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(QUICK_CPU).read_text())
    refused(capsys, [command, str(recipe), "--data", str(root), "--out", str(recipe)], "the recipe being read")
    assert recipe.read_text() == Path(QUICK_CPU).read_text()


# --- items 4 and 5: one file is one sample; symlinked class folders -------------------------------------------


def write_manifest(root: Path, rows: list[tuple[str, str]]) -> None:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k, (name, label) in enumerate(rows):
        if not (images / name).exists():
            make_image(COLOURS[label], k).save(images / name)
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows))


def test_conflicting_manifest_rows_are_an_error(capsys, tmp_path):
    rows = [(f"{c}{i}.png", c) for c in CLASSES for i in range(3)] + [("red0.png", "blue")]
    write_manifest(tmp_path, rows)
    refused(capsys, ["train", QUICK_CPU, "--data", str(tmp_path), "--set", "data.layout=csv",
                     "--set", "data.csv=labels.csv", "--set", "data.csv_image_dir=images"],
            "1 image(s)", "red0.png (blue, red)")


def test_repeated_manifest_rows_are_used_once_and_listed(tmp_path):
    rows = [(f"{c}{i}.png", c) for c in CLASSES for i in range(4)]
    write_manifest(tmp_path, rows + rows[:3])
    splits = discover(DataConfig(root=str(tmp_path), layout="csv", csv="labels.csv", csv_image_dir="images",
                                 val_fraction=0.25))
    paths = [s.path.resolve() for s in splits.train + splits.val]
    assert len(paths) == len(set(paths)) == 12  # each image once, so never in both train and validation
    assert sum("used once" in s.reason for s in splits.skipped) == 3


def test_an_image_in_train_and_val_is_an_error(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=3, val_per_class=2, test=0)
    (root / "val" / "red" / "same.jpg").symlink_to(root / "train" / "red" / "red_0.jpg")
    refused(capsys, ["train", QUICK_CPU, "--data", str(root)], "both the training and the validation")


def test_symlinked_class_folder_is_not_a_class(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=3, val_per_class=0, test=0)
    (root / "train" / "loopy").symlink_to(".")
    (root / "train" / "again").symlink_to(root / "train" / "red")
    splits = discover(DataConfig(root=str(root), val=None, val_fraction=0.34))
    assert splits.classes == CLASSES
    assert len(splits.train) + len(splits.val) == 9
    assert {s.path.name for s in splits.skipped} == {"loopy", "again"}


# --- item 6: nested test images ------------------------------------------------------------------------------


def test_images_in_sub_folders_are_not_dropped_silently(capsys, kit, tmp_path):
    images = tmp_path / "test"
    (images / "more").mkdir(parents=True)
    make_image(COLOURS["red"], 1).save(images / "0001.jpg")
    make_image(COLOURS["red"], 2).save(images / "more" / "0002.jpg")
    refused(capsys, ["predict", str(kit[1]), "--images", str(images), "--out", str(tmp_path / "s.csv")],
            "1 image(s) sit in sub-folders", "more/0002.jpg")
    assert not (tmp_path / "s.csv").exists()


# --- item 9: many classes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [120, 1000])
def test_many_classes_give_bounded_readable_figures(capsys, tmp_path, n_classes):
    """score writes the evaluation bundle; with 120 classes the matrix used to be 15 070 x 7 480 px."""
    rng = np.random.default_rng(0)
    names = [f"class_{k:04d}" for k in range(n_classes)]
    truth = rng.integers(0, n_classes, size=3 * n_classes)
    guess = np.where(rng.random(truth.size) < 0.7, truth, rng.integers(0, n_classes, size=truth.size))
    for path, labels in ((tmp_path / "truth.csv", truth), (tmp_path / "sub.csv", guess)):
        path.write_text("Id,Category\n" + "".join(f"{i},{names[k]}\n" for i, k in enumerate(labels)))
    assert main(["score", str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--out", str(tmp_path / "score")]) == 0
    capsys.readouterr()
    for name, pixels in (("confusion_matrix.png", 4_000_000), ("most_confused.png", 1_000_000),
                         ("class_recall.png", 1_500_000)):
        with Image.open(tmp_path / "score" / name) as image:
            assert image.width * image.height <= pixels, (name, image.size)


# --- numbers checked where the API receives them (options objects), so the CLI needs no checks of its own ---


@pytest.mark.parametrize("option, value, fragment", [
    ("--batch-size", "0", "--batch-size must be a whole number of at least 1, got 0"),
    ("--workers", "-1", "--workers must be a whole number of at least 0, got -1"),
    ("--topk", "-2", "--topk must be a whole number of at least 0, got -2"),
    ("--reject-below", "1.5", "--reject-below is a probability between 0 and 1"),
])
def test_predict_refuses_bad_numbers_before_loading(capsys, kit, tmp_path, option, value, fragment):
    out = tmp_path / "sub.csv"
    argv = [a for a in predict_argv(kit, out) if a not in ("--workers", "0")] + [option, value]
    refused(capsys, argv, fragment)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--workers", "-1")])
def test_evaluate_and_pseudo_label_refuse_bad_numbers(capsys, kit, tmp_path, option, value):
    root, checkpoint, _ = kit
    refused(capsys, ["evaluate", str(checkpoint), "--data", str(root / "val"), option, value], option, value)
    refused(capsys, ["pseudo-label", str(checkpoint), "--images", str(root / "test"), "--out",
                     str(tmp_path / "pseudo"), option, value], option, value)
    assert not (tmp_path / "pseudo").exists()


# --- issue 27: recipes ------------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_quickly_without_its_value(capsys, kit, tmp_path):
    levels = ["&a0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 9)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"name: [{', '.join(levels)}]\n")
    line = refused(capsys, ["train", str(recipe), "--data", str(kit[0])], "bomb.yaml", "alias")
    assert len(line) < 400 and "x, x, x" not in line
    refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", f"name=[{', '.join(levels)}]"], "alias")


def test_a_long_wrong_value_is_quoted_on_one_short_line(capsys, kit):
    line = refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", f"name={list(range(5000))}"],
                   "recipe key 'name'", "…")
    assert len(line) < 300


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_numpys_range_is_refused(capsys, kit, seed):
    refused(capsys, ["train", QUICK_CPU, "--data", str(kit[0]), "--set", f"train.seed={seed}"],
            "train.seed", str(2**32 - 1))


def test_a_duplicate_recipe_key_is_an_error_naming_key_and_line(capsys, kit, tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  epochs: 1\n  lr: 0.01\n  epochs: 5\n")
    refused(capsys, ["train", str(recipe), "--data", str(kit[0])], "'epochs' appears twice", "line 4")


def test_a_shipped_recipe_takes_one_epoch(capsys, kit, tmp_path):
    """quick_cpu.yaml warms up for one epoch; `--set train.epochs=1` used to be refused."""
    code = main(["train", QUICK_CPU, "--data", str(kit[0]), *settings(f"output={tmp_path}", "train.epochs=1")])
    assert code == 0, capsys.readouterr().err
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run / "best.pt").is_file()
    assert "warmup_epochs: 1.0" in (run / "recipe.yaml").read_text()  # clamped to the one epoch there is


def _two_runs(tmp_path: Path) -> Path:
    """Two run folders (recipe.yaml + history.csv) under tmp_path/runs: a good one and one to spoil."""
    for name in ("good", "bad"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text("name: x\ntrain:\n  epochs: 2\n  monitor: val_acc\n")
        (run / "history.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
                                         "1,1.0,0.5,1.0,0.6,0.001,3\n2,0.9,0.6,0.8,0.7,0.001,3\n")
    return tmp_path / "runs"


@pytest.mark.parametrize("spoil", ["latin1", "text"])
def test_one_unreadable_history_is_one_marked_row(capsys, tmp_path, spoil):
    root = _two_runs(tmp_path)
    history = root / "bad" / "history.csv"
    if spoil == "latin1":
        history.write_bytes(history.read_bytes() + "3,0.8,0.7,0.7,caf\xe9,0.001,3\n".encode("latin-1"))
    else:
        history.write_text(history.read_text() + "3,0.8,0.7,0.7,oops,0.001,3\n")
    assert main(["runs", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == {"good", "bad"}, out
    assert "0.7" in rows["good"] and "unreadable: " in rows["bad"], out


# --- issue 27: an empty or foreign checkpoint file, and a class too small to split ---------------------------------


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 40], ids=["empty", "random-bytes"])
def test_an_empty_or_random_checkpoint_is_one_error_line_without_unsafe_advice(capsys, kit, tmp_path, content):
    root, _, _ = kit
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    for argv in (["predict", str(bad), "--images", str(root / "test"), "--out", str(tmp_path / "s.csv")],
                 ["evaluate", str(bad), "--data", str(root / "val")],
                 ["export", str(bad)],
                 ["pseudo-label", str(bad), "--images", str(root / "test"), "--out", str(tmp_path / "p")]):
        line = refused(capsys, argv, str(bad), "best or last checkpoint")
        assert "weights_only" not in line and "False" not in line


def test_a_class_with_a_single_image_is_named(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    shutil.rmtree(root / "val")  # no validation folder: a stratified split is held out
    lonely = root / "train" / "lonely"
    lonely.mkdir()
    next((root / "train").glob("*/*.jpg")).rename(lonely / "only.jpg")
    refused(capsys, ["lr-find", "quick_cpu", "--data", str(root), "--out", str(tmp_path / "lr.png")],
            "lonely", "single image")


# --- issue 27 item 1: only a file finetune wrote is replaced without --force ---------------------------------------


@pytest.mark.parametrize("name", ["sample_submission.csv", "test_truth.csv"])
def test_predict_never_silently_replaces_a_csv_it_did_not_write(capsys, kit, tmp_path, name):
    """Same header and Ids as a prediction (a Kaggle sample submission, a copy of the truth): not ours."""
    foreign = tmp_path / name
    foreign.write_text("Id,Category\n" + "".join(f"{i:04d},red\n" for i in range(1, 5)))
    before = foreign.read_text()
    refused(capsys, predict_argv(kit, foreign), str(foreign), "--force")
    assert foreign.read_text() == before
    assert main(predict_argv(kit, foreign, "--force")) == 0  # asked for: replaced


def test_an_earlier_prediction_edited_by_hand_is_not_replaced_silently(capsys, kit, tmp_path):
    out = tmp_path / "submission.csv"
    assert main(predict_argv(kit, out, "--probs")) == 0
    assert main(predict_argv(kit, out, "--probs")) == 0  # untouched since: replaced, with a note
    assert f"replaced the earlier {out}" in capsys.readouterr().out
    out.write_text(out.read_text() + "# my notes\n")
    refused(capsys, predict_argv(kit, out, "--probs"), str(out), "changed since")
    assert out.read_text().endswith("# my notes\n")


def test_pseudo_label_csv_replaces_only_its_own_list(capsys, kit, tmp_path):
    root, checkpoint, _ = kit
    out = tmp_path / "pseudo.csv"
    argv = ["pseudo-label", str(checkpoint), "--images", str(root / "test"), "--out", str(out), "--format", "csv",
            "--threshold", "0.01", "--workers", "0"]
    out.write_text("path,label,probability\nmine.jpg,red,1.0\n")  # the header of a pseudo-label list, not ours
    refused(capsys, argv, str(out), "--force")
    assert "mine.jpg" in out.read_text()
    out.unlink()
    assert main(argv) == 0 and main(argv) == 0, capsys.readouterr().err


# --- issue 27 item 12: a killed write leaves no temporary behind for long -------------------------------------------


def test_a_temporary_stranded_by_kill_9_is_cleaned_by_the_next_run(kit, tmp_path):
    """predict is killed (SIGKILL) just before it renames its CSV into place; the next predict removes the leftover."""
    out = tmp_path / "submission.csv"
    killed = ("import os, signal, sys\n"
              "from finetune.outputs import submission\n"
              "submission.AtomicCSV.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from finetune.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", killed, *predict_argv(kit, out)], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    stranded = list(tmp_path.glob("*.tmp"))
    assert stranded and not out.exists()
    assert main(predict_argv(kit, out)) == 0
    no_leftovers(tmp_path)
    assert out.is_file()


# --- issue 27 item 2: a hard link is the same file -------------------------------------------------------------


def test_a_file_hard_linked_under_two_labels_is_refused(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    first = next((root / "train" / CLASSES[0]).glob("*.jpg"))
    os.link(first, root / "train" / CLASSES[1] / "copy.jpg")
    refused(capsys, ["train", QUICK_CPU, "--data", str(root), *settings(f"output={tmp_path / 'runs'}")],
            "two or more labels", first.name)


def test_a_file_hard_linked_twice_in_one_class_is_one_sample(tmp_path):
    root = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    first = next((root / "train" / CLASSES[0]).glob("*.jpg"))
    os.link(first, root / "train" / CLASSES[0] / "again.jpg")
    splits = discover(DataConfig(root=str(root)))
    assert len(splits.train) == 3 * len(CLASSES)
    assert [s.path.name for s in splits.skipped if "used once" in s.reason] in (["again.jpg"], [first.name])


def test_a_file_hard_linked_into_training_and_validation_is_refused(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    first = next((root / "train" / CLASSES[0]).glob("*.jpg"))
    os.link(first, root / "val" / CLASSES[0] / "leak.jpg")
    refused(capsys, ["train", QUICK_CPU, "--data", str(root), *settings(f"output={tmp_path / 'runs'}")],
            "both the training and the validation data")


# --- issue 27 item 3: entries that only look like images get a row or a line, never silence -----------------------


def _odd_entries(folder: Path) -> list[str]:
    """A FIFO, a symlink to /dev/zero and a dangling symlink, each named like an image."""
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "gone.jpg").symlink_to(folder / "no-such-file.jpg")
    return ["pipe.jpg", "zero.png", "gone.jpg"]


def test_test_folder_entries_that_are_not_files_get_rows_and_are_listed(capsys, kit, tmp_path):
    root, checkpoint, _ = kit
    images = tmp_path / "test"
    shutil.copytree(root / "test", images)
    odd = _odd_entries(images)
    out = tmp_path / "submission.csv"
    assert main(["predict", str(checkpoint), "--images", str(images), "--out", str(out), "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 + len(odd) and f"for {4 + len(odd)} images" in stdout
    listed = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(
        (tmp_path / "submission_unreadable.csv").open())}
    assert set(listed) == set(odd)
    assert "FIFO" in listed["pipe.jpg"] and "character device" in listed["zero.png"]
    assert "broken symlink" in listed["gone.jpg"]


def test_training_folder_entries_that_are_not_files_are_listed(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    odd = _odd_entries(root / "train" / CLASSES[0])
    out = tmp_path / "runs"
    assert main(["train", QUICK_CPU, "--data", str(root), *settings(f"output={out}", "train.epochs=1")]) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    listed = {Path(r["path"]).name for r in csv.DictReader((run / "skipped_images.csv").open())}
    assert set(odd) <= listed


# --- issue 27 item 5: no command writes figures where they would be read as images ------------------------------


@pytest.mark.parametrize("where", ["test", "train", "train/red/scores"])
def test_score_never_writes_its_figures_among_images(capsys, kit, tmp_path, where):
    root, checkpoint, _ = kit
    data = tmp_path / "data"
    shutil.copytree(root, data)
    submission, truth = tmp_path / "submission.csv", tmp_path / "truth.csv"
    truth.write_text("Id,Category\n" + "".join(f"{i:04d},red\n" for i in range(1, 5)))
    assert main(predict_argv((data, checkpoint, None), submission)) == 0
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = data / where if where != "train" else data / "train" / "scores"  # a new folder beside class folders
    refused(capsys, ["score", str(submission), "--truth", str(truth), "--out", str(out)], "folder of images", "--out")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert main(["score", str(submission), "--truth", str(truth)]) == 0  # beside the submission: fine
    assert (tmp_path / "submission_score" / "confusion_matrix.png").is_file()
    assert main(predict_argv((data, checkpoint, None), submission)) == 0  # and the test folder is as it was
    assert len(list(csv.reader(submission.open()))) == 5


def test_report_never_writes_among_images(capsys, kit, tmp_path):
    root, checkpoint, _ = kit
    data = tmp_path / "data"
    shutil.copytree(root, data)
    outside = tmp_path / "eval"
    assert main(["evaluate", str(checkpoint), "--data", str(data / "val"), "--out", str(outside),
                 "--workers", "0"]) == 0
    inside = data / "test"
    shutil.copytree(outside, inside, dirs_exist_ok=True)  # a bundle moved in among the test images by hand
    (inside / "report.html").unlink()
    refused(capsys, ["report", str(checkpoint.parent), "--eval-dir", str(inside)], "folder of images")
    assert not (inside / "report.html").exists()


# --- issue 27 item 10: a location the user cannot write to is one line, before the work ----------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A trained run, data and a read-only folder, in a tree that every user may read; yields (root, run, ro, as_user).

    `as_user()` runs a block as a user for whom the read-only folders are read-only: root ignores file modes,
    so as root the block runs with the effective uid of `nobody`.
    """
    import contextlib
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="finetune-ro-"))
    root = write_folder_dataset(base / "data", per_class=3, val_per_class=1, test=3)
    assert main(["train", QUICK_CPU, "--data", str(root), *settings(f"output={base / 'runs'}", "train.epochs=1")]) == 0
    (run,) = (base / "runs").iterdir()
    ro = base / "ro"
    ro.mkdir()
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in [ro, run, run / "eval"]:
        path.chmod(0o555)

    @contextlib.contextmanager
    def as_user():
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)

    yield root, run, ro, as_user
    for path in [ro, run, run / "eval"]:
        path.chmod(0o755)
    shutil.rmtree(base)


@pytest.mark.parametrize("command", ["train", "resume", "predict", "evaluate", "evaluate-default", "export",
                                     "pseudo-label", "report"])
def test_a_read_only_output_is_one_error_line(capsys, locked, command):
    root, run, ro, as_user = locked
    best = str(run / "best.pt")
    argv = {
        "train": ["train", QUICK_CPU, "--data", str(root), *settings(f"output={ro}", "train.epochs=1")],
        "resume": ["train", "--resume", str(run), "--set", "train.epochs=2"],
        "predict": ["predict", best, "--images", str(root / "test"), "--out", str(ro / "s.csv")],
        "evaluate": ["evaluate", best, "--data", str(root / "val"), "--out", str(ro / "eval")],
        "evaluate-default": ["evaluate", best, "--data", str(root / "val")],
        "export": ["export", best, "--format", "torchscript", "--out", str(ro / "model.ts")],
        "pseudo-label": ["pseudo-label", best, "--images", str(root / "test"), "--out", str(ro / "pseudo")],
        "report": ["report", str(run)],
    }[command]
    with as_user():
        line = refused(capsys, argv, "cannot write in", "Permission denied")
    assert str(ro) in line or str(run) in line
    assert not any(ro.iterdir())


# --- issue 27 item 14: every shipped recipe takes any epoch count --------------------------------------------------


def _shipped_recipes() -> list[str]:
    from finetune.config.recipe_library import shipped_recipes
    return sorted(shipped_recipes())


@pytest.mark.parametrize("name", _shipped_recipes())
def test_every_shipped_recipe_reads_with_one_epoch(name):
    """Staged schedules (fine_tune, unfreeze at epoch 3/4) used to refuse `--set train.epochs=1`."""
    assert load_recipe(name, ["train.epochs=1"]).train.epochs == 1


def test_a_staged_recipe_shortened_to_one_epoch_trains_and_says_what_stays_frozen(capsys, kit, tmp_path):
    code = main(["train", QUICK_CPU, "--data", str(kit[0]),
                 *settings(f"output={tmp_path}", "train.epochs=1", "train.fine_tune=1")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train.fine_tune=1 head-only epoch(s) fill all train.epochs=1" in out
