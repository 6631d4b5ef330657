"""Fashion-MNIST export: folder layout, unlabeled test set with separate answers, clear errors."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.workflows import datasets
from finetune.cli import main
from finetune.workflows.datasets import FASHION_MNIST_CLASSES, FashionMNISTSplit, export_fashion_mnist
from finetune.errors import FinetuneError


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_source(tmp_path: Path) -> Path:
    """Four IDX files like Fashion-MNIST's: each image's pixels are 20 * its label, so files reveal labels."""
    folder = tmp_path / "source"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 80), ("t10k", 30)):
        labels = rng.permutation(np.arange(count) % 10)
        images = np.repeat((labels * 20)[:, None, None], 28, axis=1).repeat(28, axis=2)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def _label_of(path: Path) -> int:
    return int(np.asarray(Image.open(path))[0, 0]) // 20


def test_export_writes_class_folders_unlabeled_test_and_separate_answers(tmp_path: Path, fake_source: Path):
    export = export_fashion_mnist(tmp_path / "fm", FashionMNISTSplit(3, 2, test_limit=25), source=fake_source)
    assert sorted(p.name for p in export.train_dir.iterdir()) == sorted(FASHION_MNIST_CLASSES)
    for split, per_class in ((export.train_dir, 3), (export.val_dir, 2)):
        for label, name in enumerate(FASHION_MNIST_CLASSES):
            files = sorted((split / name).glob("*.png"))
            assert len(files) == per_class
            assert {_label_of(f) for f in files} == {label}
    train_names = {p.name for p in export.train_dir.rglob("*.png")}
    assert not train_names & {p.name for p in export.val_dir.rglob("*.png")}, "train and val must not overlap"

    test_files = sorted(export.test_dir.iterdir())
    assert [p.name for p in test_files] == [f"{i:05d}.png" for i in range(1, 26)]
    assert export.truth_csv.parent == export.root and export.truth_csv.parent != export.test_dir
    with export.truth_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["Id"] for r in rows] == [p.stem for p in test_files]
    assert [r["Category"] for r in rows] == [FASHION_MNIST_CLASSES[_label_of(p)] for p in test_files]
    assert export.counts == {"train": 30, "val": 20, "test": 25}


def test_export_reuses_matching_export_and_refuses_to_overwrite(tmp_path: Path, fake_source: Path):
    export_fashion_mnist(tmp_path / "fm", FashionMNISTSplit(2, 1, test_limit=5), source=fake_source)
    again = export_fashion_mnist(tmp_path / "fm", FashionMNISTSplit(2, 1, test_limit=5), source=fake_source,
                                 reuse=True)
    assert again.reused
    with pytest.raises(FinetuneError, match="not empty"):
        export_fashion_mnist(tmp_path / "fm", FashionMNISTSplit(4, 1, test_limit=5), source=fake_source,
                             reuse=True)


def test_export_asks_for_fewer_images_than_a_class_has(tmp_path: Path, fake_source: Path):
    with pytest.raises(FinetuneError, match="lower --per-class"):
        export_fashion_mnist(tmp_path / "fm", FashionMNISTSplit(7, 2), source=fake_source)


def test_no_local_files_and_no_download_gives_a_clear_error(tmp_path: Path, monkeypatch):
    def offline(root: Path):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "_download", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FinetuneError) as err:
        export_fashion_mnist(tmp_path / "fm", source=empty)
    message = str(err.value)
    assert "apt install dataset-fashion-mnist" in message and "network unreachable" in message
    assert not (tmp_path / "fm").exists()


def test_cli_datasets_command(tmp_path: Path, fake_source: Path, capsys):
    out = tmp_path / "cli_fm"
    code = main(["datasets", "fashion-mnist", "--out", str(out), "--per-class", "2", "--val-per-class", "1",
                 "--test-limit", "7", "--source", str(fake_source)])
    assert code == 0
    assert len(list((out / "test").iterdir())) == 7
    assert len(list((out / "train").rglob("*.png"))) == 20
    assert str(out / "test_truth.csv") in capsys.readouterr().out
    assert main(["datasets", "fashion-mnist", "--out", str(out), "--source", str(fake_source)]) == 2


def test_export_in_the_hw03_2021_layout_with_an_unlabeled_pool(tmp_path: Path, fake_source: Path):
    from finetune.workflows.opening import prepare_data as prepare
    from finetune.config.recipe import DataConfig, Recipe

    assert main(["datasets", "fashion-mnist", "--out", str(tmp_path / "fm"), "--per-class", "2",
                 "--val-per-class", "1", "--test-limit", "5", "--unlabeled", "40", "--layout", "hw03-2021",
                 "--source", str(fake_source)]) == 0
    root = tmp_path / "fm"
    pool = sorted((root / "training" / "unlabeled" / "00").iterdir())
    assert len(pool) == 40 and len(list((root / "testing" / "00").iterdir())) == 5
    with (root / "unlabeled_truth.csv").open() as handle:
        truth = {r["Id"]: r["Category"] for r in csv.DictReader(handle)}
    assert truth == {p.stem: FASHION_MNIST_CLASSES[_label_of(p)] for p in pool}
    # Labelled files are named by their index in the training set: the pool never repeats one of them.
    taken = [int(p.stem) for p in (root / "training" / "labeled").rglob("*.png")]
    taken += [int(p.stem) for p in (root / "validation").rglob("*.png")]
    assert len(taken) == 30
    rest = datasets._pick_unlabeled(50, np.zeros(80), taken, np.random.default_rng(1))
    assert len(set(rest)) == 50 and not set(rest) & set(taken)  # all that is left, none of the labelled
    prepared = prepare(Recipe(data=DataConfig(root=str(root))), print)
    assert sorted(prepared.classes) == sorted(FASHION_MNIST_CLASSES)
    assert prepared.unlabeled_dir == root / "training" / "unlabeled"
    assert prepared.test_dir == root / "testing" / "00" and len(prepared.train) == 20
    assert main(["datasets", "fashion-mnist", "--out", str(tmp_path / "fm2"), "--per-class", "2",
                 "--val-per-class", "1", "--unlabeled", "51", "--source", str(fake_source)]) == 2  # 50 left
