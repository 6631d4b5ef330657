"""WebDataset shards: written from each layout, they train, evaluate and predict as the folder they came from; under
2 gloo processes each sample is seen once per epoch; bad shards are a clear error or a listed skip."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import QUICK_CPU, TINY_OVERRIDES, make_image, write_folder_dataset, write_hw03_dataset
from test_multilabel import write_multilabel_dataset

from finetune.config.recipe import load_recipe
from finetune.data.loaders import Targets, train_loader
from finetune.data.prepare import prepare
from finetune.data.preprocessing import Preprocessing
from finetune.data import shard_members
from finetune.data.shard_members import ShardSamples
from finetune.data.shards import escape_key, load_index, unescape_key
from finetune.data.sources import shard_set_samples
from finetune.errors import FinetuneError
from finetune.tasks import task_of
from finetune.workflows import api
from finetune.workflows.sharding import shard_dataset

QUIET = lambda line: None  # noqa: E731
SHARDS = ["data.layout=shards"]


def _shard(data: Path, out: Path, overrides: list[str] = (), size: int = 5) -> list:
    return shard_dataset(data, out, QUICK_CPU, shard_size=size, overrides=list(overrides), log=QUIET)


def _history(run: Path) -> list[dict]:
    with (run / "history.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _samples(data: Path, overrides: list[str]) -> tuple[list[str], list[tuple[str, object]]]:
    recipe = load_recipe(QUICK_CPU, overrides)
    recipe.data.root = str(data)
    prepared = prepare(recipe, task_of(recipe), QUIET)
    return prepared.classes, [(s.path.name, s.target) for s in [*prepared.train, *prepared.val]]


@pytest.mark.parametrize("layout", ["filename", "csv", "multilabel"])
def test_shards_hold_the_samples_of_each_layout_in_the_folder_order(tmp_path: Path, layout: str) -> None:
    if layout == "filename":
        data, settings = write_hw03_dataset(tmp_path / "data"), []
    elif layout == "csv":
        data = write_folder_dataset(tmp_path / "data")
        with (data / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for path in sorted((data / "train").rglob("*.jpg")):
                writer.writerow([path.relative_to(data).as_posix(), path.parent.name])
        settings = ["data.layout=csv", "data.csv=manifest.csv"]
    else:
        data = write_multilabel_dataset(tmp_path / "data", count=20, test=4)
        settings = ["data.task=multilabel", "data.layout=csv", "data.csv=labels.csv", "data.csv_image_dir=images"]
    indexes = _shard(data, tmp_path / "shards", settings)
    assert [index.split for index in indexes] == ["train", "val", "test"]
    from_folder = _samples(data, settings)
    from_shards = _samples(tmp_path / "shards", [*settings, *SHARDS])
    assert from_shards == from_folder  # same classes, names, targets and order
    assert indexes[2].count == len(list((data / "test").glob("*.*g")))
    # Evaluating with a model whose classes come in another order: the targets follow the model's classes.
    classes = from_folder[0]
    samples, skipped = shard_set_samples(tmp_path / "shards" / "val-index.json", classes[::-1])
    folder_val = from_folder[1][-len(samples):]
    assert not skipped and [s.path.name for s in samples] == [name for name, _ in folder_val]
    flip = lambda k: len(classes) - 1 - k  # noqa: E731
    assert [s.target for s in samples] == [tuple(sorted(map(flip, t))) if isinstance(t, tuple) else flip(t)
                                           for _, t in folder_val]


def test_shards_train_evaluate_and_predict_as_the_folder(tmp_path: Path, one_torch_thread) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=6, val_per_class=2, test=5)
    (data / "train" / "red" / "notes.v2.jpg").write_bytes(b"not an image")  # left out and listed, with a dot
    make_image((200, 40, 40), 99).save(data / "train" / "red" / "photo.v2.jpg")  # a dot: escaped in the key
    _shard(data, tmp_path / "shards")
    settings = [*TINY_OVERRIDES, f"output={tmp_path / 'runs'}", "train.loggers=[csv]"]
    folder = api.train(QUICK_CPU, data=data, overrides=[*settings, "name=folder"], log=QUIET)
    # data.layout: auto finds the shard sets' index (the run's recipe.yaml then says shards).
    shards = api.train(QUICK_CPU, data=tmp_path / "shards", overrides=[*settings, "name=shards"], log=QUIET)
    assert "layout: shards" in (shards.run_dir / "recipe.yaml").read_text()
    assert _history(shards.run_dir) == _history(folder.run_dir)
    assert [s.path.name for s in shards.skipped] == ["notes.v2.jpg"]
    assert shards.evaluation["accuracy"] == pytest.approx(folder.evaluation["accuracy"])
    # The folder's model on the shards' validation set and test set: the same metrics, the same submission.
    on_folder = api.evaluate(folder.best_checkpoint, data / "val", out=tmp_path / "ev1", log=QUIET)
    on_shards = api.evaluate(folder.best_checkpoint, tmp_path / "shards" / "val-{000000..000001}.tar",
                             out=tmp_path / "ev2", log=QUIET)
    assert on_shards["accuracy"] == pytest.approx(on_folder["accuracy"])
    assert on_shards["confusion_matrix"] == on_folder["confusion_matrix"]
    api.predict(folder.best_checkpoint, data / "test", out=tmp_path / "a.csv", log=QUIET)
    api.predict(folder.best_checkpoint, tmp_path / "shards" / "test-index.json", out=tmp_path / "b.csv", log=QUIET)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_keys_escape_dots_and_names_come_back_whole(tmp_path: Path) -> None:
    for name in ["cat/001", "a.b/c.d", "100%", "%2E"]:
        assert "." not in escape_key(name) and unescape_key(escape_key(name)) == name
    data = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=0)
    with pytest.raises(FinetuneError, match="overlap; write the shards to a folder outside the data"):
        _shard(data, data / "shards")
    make_image((200, 40, 40), 5).save(data / "train" / "red" / "x.y.jpg")
    _shard(data, tmp_path / "shards", size=100)
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert "train/red/x%2Ey.jpg" in names and "train/red/x%2Ey.cls" in names
    samples = ShardSamples(load_index(tmp_path / "shards" / "train-index.json"), 3)
    assert any(s.path.name == "x.y.jpg" for s in samples)
    again = pickle.loads(pickle.dumps(samples))  # as a spawned loader worker gets it: small, and the same samples
    assert len(pickle.dumps(samples)) < 4000 and list(again) == list(samples)
    # Training reads where each image sits from the member table: no tar header is read.
    assert not [key for key in shard_members._SCANNED if str(tmp_path) in key]
    assert shard_members.read_member(samples[0].path) == (data / "train" / samples[0].path.relative_to(
        tmp_path / "shards" / "train-000000.tar" / "train")).read_bytes()


def _rank_seen(rank: int, world: int, shards: str, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    recipe = load_recipe(QUICK_CPU, [*TINY_OVERRIDES, "data.batch_size=3", "augment.preset=none"])
    samples = ShardSamples(load_index(shards), 3)
    targets = Targets(3, encode=lambda sample: str(sample.path))  # the loader hands back which sample it read
    seen = []
    loader = train_loader(recipe, samples, Preprocessing(size=16), targets, rank, world)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen.append([path for _, paths in loader for path in paths])
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, seen)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_see_each_sample_once_per_epoch(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=6, val_per_class=1, test=0)  # 18 images, 4 shards
    _shard(data, tmp_path / "shards")
    out = tmp_path / "seen.json"
    torch.multiprocessing.spawn(_rank_seen, args=(2, str(tmp_path / "shards" / "train-index.json"),
                                                  str(tmp_path / "init"), str(out)), nprocs=2)
    ranks = json.loads(out.read_text())
    expected = sorted(str(s.path) for s in ShardSamples(load_index(tmp_path / "shards" / "train-index.json"), 3))
    for epoch in range(2):
        both = ranks[0][epoch] + ranks[1][epoch]
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 9
        assert sorted(both) == expected  # every sample once
    assert ranks[0][0] != ranks[0][1]  # a new order each epoch


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    make_image((40, 190, 60), 3).save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_samples_are_listed_and_bad_shards_stop_the_run_with_what_to_do(tmp_path: Path,
                                                                             one_torch_thread) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=4, val_per_class=1, test=2)
    _shard(data, tmp_path / "shards", size=100)
    shards = tmp_path / "shards"
    # A hand-made shard beside the written one: a sample without an image, one without a label, one whose class
    # the index lacks, and a good one.
    _tar(shards / "train-000001.tar", {"a/noimage.cls": b"0", "a/nolabel.jpg": _jpeg(), "a/unknown.jpg": _jpeg(),
                                       "a/unknown.cls": b"7", "a/good.jpg": _jpeg(), "a/good.cls": b"1"})
    index = json.loads((shards / "train-index.json").read_text())
    index["shards"].append({"name": "train-000001.tar", "count": 4})
    (shards / "train-index.json").write_text(json.dumps(index))
    settings = [*TINY_OVERRIDES, *SHARDS, f"output={tmp_path / 'runs'}", "train.epochs=1", "train.loggers=[csv]",
                "data.cache=ram"]  # the cache reads shards too; a bad sample is still listed
    result = api.train(QUICK_CPU, data=shards, overrides=settings, log=QUIET)
    reasons = {path.name: why for path, why in ((s.path, s.reason) for s in result.skipped)}
    assert set(reasons) == {"noimage", "nolabel.jpg", "unknown.jpg"}
    assert "no image" in reasons["noimage"] and "no label" in reasons["nolabel.jpg"]
    assert "class index 7" in reasons["unknown.jpg"]
    listed = (result.run_dir / "skipped_images.csv").read_text()
    assert "nolabel.jpg" in listed and "unknown.jpg" in listed

    truncated = shards / "val-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])
    with pytest.raises(FinetuneError, match="truncated or damaged|truncated"):
        api.train(QUICK_CPU, data=shards, overrides=settings, log=QUIET)
    (shards / "test-000000.tar").unlink()
    with pytest.raises(FinetuneError, match="test-000000.tar listed in .* is missing"):
        load_index(shards / "test-index.json")
    with pytest.raises(FinetuneError, match="not supported yet"):
        load_index("https://example.com/train-{000000..000009}.tar")
    with pytest.raises(FinetuneError, match="does not list"):
        load_index(shards / "train-{000000..000005}.tar")


def test_the_command_line_writes_shards_and_a_bad_index_is_one_line(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=3, val_per_class=1, test=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "finetune", "datasets", "shard", str(data), "--out",
                           str(tmp_path / "shards"), "--shard-size", "4"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "train: 9 images in 3 shard(s)" in done.stdout and "data.layout=shards" in done.stdout
    with pytest.raises(FinetuneError, match="holds shard sets, not images: name one, e.g. --images .*test-index"):
        api.test_image_paths(tmp_path / "shards")
    (tmp_path / "shards" / "val-index.json").write_text("{}")
    failed = subprocess.run([sys.executable, "-m", "finetune", "train", QUICK_CPU, "--data", str(tmp_path / "shards"),
                             "--set", "data.layout=shards"], capture_output=True, text=True, env=env)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "is not a shard index written by finetune datasets shard" in failed.stderr


def test_a_run_on_shards_resumes_exactly(tmp_path: Path, one_torch_thread) -> None:
    data = write_folder_dataset(tmp_path / "data", per_class=6, val_per_class=2, test=0)
    _shard(data, tmp_path / "shards")
    settings = [*TINY_OVERRIDES, *SHARDS, "train.epochs=3", "train.loggers=[csv]", "augment.mixup=0.2"]
    whole = api.train(QUICK_CPU, data=tmp_path / "shards", overrides=[*settings, f"output={tmp_path / 'whole'}"],
                      log=QUIET)

    def stop_after_epoch_2(message: str) -> None:
        if message.startswith("epoch 2/3"):
            raise KeyboardInterrupt  # as Ctrl-C would, right after epoch 2 was saved

    with pytest.raises(KeyboardInterrupt):
        api.train(QUICK_CPU, data=tmp_path / "shards", overrides=[*settings, f"output={tmp_path / 'cut'}"],
                  log=stop_after_epoch_2)
    resumed = api.train(resume=tmp_path / "cut" / "quick_cpu", log=QUIET)
    assert _history(resumed.run_dir) == _history(whole.run_dir)
