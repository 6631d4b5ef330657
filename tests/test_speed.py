"""Speed paths that must not change results: decode once (unreadable images skipped in the loader), reduced-scale
JPEG decode, the pre-resized image cache, cached backbone features, precision and compile options."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune.cli import main
from finetune.data.cache import ImageCache
from finetune.data.images import check_headers, load_rgb
from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from tests.conftest import TINY_OVERRIDES, make_image, write_folder_dataset


def _truncated_jpeg(path, colour=(200, 40, 40)):
    buffer = io.BytesIO()
    make_image(colour, 7, size=64).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_header_check_passes_a_truncated_jpeg_that_the_loader_then_skips(tmp_path):
    good, cut, junk = tmp_path / "good.jpg", tmp_path / "cut.jpg", tmp_path / "junk.jpg"
    make_image((10, 200, 10), 1).save(good)
    _truncated_jpeg(cut)
    junk.write_bytes(b"not an image")
    assert [s.path for s in check_headers([good, cut, junk])] == [junk]
    samples = [Sample(good, 0), Sample(cut, 1), Sample(good, 0)]
    seen = []
    loader = make_loader(ImageDataset(samples, lambda image: {"image": torch.from_numpy(image.copy())}), 2, 0,
                         on_skip=seen.append)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [1, 1]  # the damaged image left its batch
    assert [s.path for s in seen] == [cut] and list(loader.skipped) == [cut]
    list(loader)  # a second epoch meets it again: still listed once
    assert len(seen) == 1


def test_a_corrupt_image_found_mid_training_is_skipped_and_listed(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=6, val_per_class=2, test=1)
    _truncated_jpeg(root / "train" / "red" / "cut.jpg")
    _truncated_jpeg(root / "val" / "blue" / "cut_val.jpg", (50, 60, 210))
    (root / "train" / "green" / "junk.jpg").write_bytes(b"garbage")
    lines = []
    # A batch larger than the folder: no image falls into a dropped last batch, so the epoch meets each one.
    result = finetune.train(None, data=root, overrides=TINY_OVERRIDES + [
        f"output={tmp_path}", "train.epochs=2", "train.warmup_epochs=0", "data.batch_size=32"], log=lines.append)
    assert sorted(s.path.name for s in result.skipped) == ["cut.jpg", "cut_val.jpg", "junk.jpg"]
    with (result.run_dir / "skipped_images.csv").open() as handle:
        listed = sorted(row["path"].rsplit("/", 1)[-1] for row in csv.DictReader(handle))
    assert listed == ["cut.jpg", "cut_val.jpg", "junk.jpg"]
    assert sum("cut.jpg, which does not decode" in line for line in lines) == 1  # warned once, not per epoch
    assert result.evaluation["images"] == 6  # the damaged validation image is not scored


def test_jpeg_draft_decodes_at_reduced_scale_but_never_below_the_size_asked(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((512, 680, 3), 120, np.uint8)).save(path)
    assert load_rgb(path).shape == (512, 680, 3)
    small = load_rgb(path, min_side=100)
    assert small.shape == (128, 170, 3)  # 1/4 scale: the smallest that keeps the shorter side >= 100
    assert load_rgb(path, min_side=300).shape == (512, 680, 3)  # 1/2 would be 256 < 300
    png = tmp_path / "big.png"
    Image.fromarray(np.full((512, 680, 3), 120, np.uint8)).save(png)
    assert load_rgb(png, min_side=100).shape == (512, 680, 3)  # only JPEG has a reduced-scale decode


def _history(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_head_only_training_on_cached_features_matches_the_uncached_run(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=6, val_per_class=2, test=1)
    base = TINY_OVERRIDES + ["augment.preset=none", "model.trainable=[]", "train.epochs=2", "train.warmup_epochs=0",
                             "train.channels_last=false"]
    runs = {}
    for choice in ("false", "null"):
        lines = []
        runs[choice] = finetune.train(None, data=root, overrides=base + [f"output={tmp_path / choice}",
                                                                         f"train.cache_features={choice}"],
                                      log=lines.append)
        assert any("cached backbone features" in line for line in lines) == (choice == "null")
    plain, cached = (_history(runs[c].run_dir) for c in ("false", "null"))
    assert len(plain) == len(cached) == 2
    for a, b in zip(plain, cached):
        for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4), (column, plain, cached)
    heads = [torch.load(runs[c].best_checkpoint, weights_only=True)["model_state"] for c in ("false", "null")]
    for name, value in heads[0].items():
        if name.startswith("head.") and value.is_floating_point():
            assert torch.allclose(value, heads[1][name], atol=1e-4), name


def test_fine_tune_caches_only_its_head_only_epochs_and_trains_through_the_ram_cache(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=6, val_per_class=2, test=1)
    _truncated_jpeg(root / "val" / "blue" / "cut.jpg", (50, 60, 210))
    lines = []
    result = finetune.train(None, data=root, overrides=TINY_OVERRIDES + [
        f"output={tmp_path}", "augment.preset=light", "train.cache_features=true", "train.fine_tune=1",
        "train.epochs=2", "train.warmup_epochs=0", "data.cache=ram"], log=lines.append)
    assert sum("cached backbone features" in line for line in lines) == 1
    assert any("trainable stages now" in line for line in lines)  # epoch 2 trains the body on images again
    assert [s.path.name for s in result.skipped] == ["cut.jpg"]  # the ram cache reports what it could not decode


def test_cache_features_refuses_mixup(tmp_path):
    with pytest.raises(FinetuneError, match="train.cache_features"):
        finetune.train(None, data=tmp_path, overrides=["train.cache_features=true", "augment.mixup=0.2"])


def test_fp16_on_a_cpu_is_refused_bf16_trains_and_compile_falls_back_with_one_warning(tmp_path, monkeypatch):
    root = write_folder_dataset(tmp_path / "d", per_class=4, val_per_class=2, test=1)
    with pytest.raises(FinetuneError, match="fp16 needs a CUDA GPU"):
        finetune.train(None, data=root, overrides=TINY_OVERRIDES + [f"output={tmp_path}", "train.precision=fp16",
                                                                    "train.device=cpu"], log=lambda _: None)
    assert not list(tmp_path.glob("*/best.pt"))  # refused before a run folder was made

    def broken(self, *args, **kwargs):
        raise RuntimeError("no backend for this platform")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    lines = []
    result = finetune.train(None, data=root, overrides=TINY_OVERRIDES + [
        f"output={tmp_path}", "train.precision=bf16", "train.device=cpu", "train.compile=true", "train.epochs=1",
        "train.warmup_epochs=0"], log=lines.append)
    assert np.isfinite(float(_history(result.run_dir)[0]["train_loss"]))
    assert [line for line in lines if "torch.compile" in line] == [
        "warning: train.compile: torch.compile failed here (no backend for this platform); training without it"]

    _truncated_jpeg(root / "test" / "0099.jpg")  # passes the header check; decoded once, while predicting
    outputs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.csv"
        assert main(["predict", str(result.best_checkpoint), "--images", str(root / "test"), "--out", str(out),
                     "--precision", precision, "--probs"]) == 0
        with out.with_name(f"{precision}_probs.csv").open() as handle:
            outputs[precision] = np.array([[float(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]])
    with (tmp_path / "fp32_unreadable.csv").open() as handle:
        assert [row["path"].rsplit("/", 1)[-1] for row in csv.DictReader(handle)] == ["0099.jpg"]
    assert outputs["bf16"].shape == outputs["fp32"].shape == (2, 3)  # a row for the damaged image too
    assert np.abs(outputs["bf16"] - outputs["fp32"]).max() < 0.05  # bf16 keeps ~3 significant digits
    assert main(["predict", str(result.best_checkpoint), "--images", str(root / "test"), "--out",
                 str(tmp_path / "x.csv"), "--precision", "fp16", "--device", "cpu"]) != 0


def test_ram_cache_is_shared_and_disk_cache_rereads_a_changed_file(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(np.full((200, 300, 3), 60 * i, np.uint8)).save(paths[-1])
    ram = ImageCache("ram", None, 50)
    ram.fill(paths)
    assert ram.pixels.is_shared()  # DataLoader workers map the same memory
    assert ram.read(paths[1]).shape == (50, 75, 3) and abs(int(ram.read(paths[1]).mean()) - 60) <= 2
    disk = ImageCache("disk", tmp_path / "cache", 50)
    first = disk.read(paths[0])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    np.testing.assert_array_equal(disk.read(paths[0]), first)  # served from the cache file
    Image.fromarray(np.full((200, 300, 3), 250, np.uint8)).save(paths[0])  # same name, new pixels
    assert int(disk.read(paths[0]).mean()) >= 245
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
