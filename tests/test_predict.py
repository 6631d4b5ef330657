"""predict: submission rows and Ids, sample submissions, probabilities/top-k, TTA, ensembles, streaming."""

from __future__ import annotations

import csv
import gc
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OVERRIDES, write_folder_dataset
from finetune import FinetuneError, load_model, predict, train
from finetune.cli import main
from finetune.config.options import InferenceOptions, SubmissionOptions
from finetune.data.images import load_rgb
from finetune.data.transforms import build_eval_transform
from finetune.engine.checkpoint import read_checkpoint, save_checkpoint
from finetune.outputs.submission import SubmissionFiles, SubmissionPlan, image_ids, write_rows
from finetune.inference.tta import parse_tta
from untrained import untrained_checkpoint

quiet = lambda line: None  # noqa: E731


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run on the colour data (6 test images 0001..0006), and a perturbed copy of its checkpoint."""
    tmp = tmp_path_factory.mktemp("predict")
    root = write_folder_dataset(tmp / "shapes", per_class=10, val_per_class=3, test=6)
    result = train(None, data=root, overrides=TINY_OVERRIDES + [f"output={tmp / 'runs'}"], log=quiet)
    payload = read_checkpoint(result.best_checkpoint)
    torch.manual_seed(1)
    # Perturb the weights, not BatchNorm's running statistics (a negative variance would give NaNs).
    payload["model_state"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and "running_" not in k
                              else v for k, v in payload["model_state"].items()}
    other = tmp / "other.pt"
    save_checkpoint(other, {k: v for k, v in payload.items() if k not in ("format", "versions")})
    return root, result.best_checkpoint, other, tmp


def manual_probs(checkpoint: Path, paths: list[Path], flip: bool = False) -> np.ndarray:
    """Softmax of the model on the evaluation view (and its mirror), computed without the inference code.

    The logits are divided by the checkpoint's fitted temperature: every probability written is calibrated.
    """
    loaded = load_model(checkpoint)
    transform = build_eval_transform(loaded.preprocessing)
    batch = torch.stack([transform(image=load_rgb(p))["image"] for p in paths])
    t = loaded.checkpoint.get("temperature", 1.0)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(batch) / t, 1)
        if flip:
            probs = (probs + torch.softmax(loaded.model(torch.flip(batch, dims=[-1])) / t, 1)) / 2
    return probs.numpy()


def test_submission_has_one_row_per_image_with_zero_padded_sorted_ids(trained, tmp_path):
    root, ckpt, _, _ = trained
    out = predict(ckpt, root / "test", out=tmp_path / "sub.csv", submission=SubmissionOptions(probs=True, topk=2),
                  inference=InferenceOptions(num_workers=0), log=quiet)
    table = rows(out)
    assert table[0] == ["Id", "Category"]
    assert [r[0] for r in table[1:]] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    # The colour classes are easy: test images cycle red, green, blue.
    assert [r[1] for r in table[1:]] == ["red", "green", "blue"] * 2
    probs = rows(tmp_path / "sub_probs.csv")
    assert probs[0] == ["Id", "blue", "green", "red"]
    values = np.array([[float(v) for v in r[1:]] for r in probs[1:]])
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-4)
    names = probs[0][1:]
    assert [names[k] for k in values.argmax(1)] == [r[1] for r in table[1:]]
    top = rows(tmp_path / "sub_top2.csv")
    assert top[0] == ["Id", "class_1", "score_1", "class_2", "score_2"]
    for r, p in zip(top[1:], values):
        assert r[1] == names[p.argmax()] and float(r[2]) >= float(r[4])
        assert float(r[2]) == pytest.approx(p.max(), abs=1e-5)


def test_ids_keep_zero_padding_and_index_follows_the_hw03_sample_code(tmp_path):
    paths = [tmp_path / n for n in ("0010.jpg", "0002.jpg", "0001.png")]
    assert image_ids(paths) == ["0010", "0002", "0001"]
    assert image_ids(paths, "name") == ["0010.jpg", "0002.jpg", "0001.png"]
    # HW03's pad4(i) for i in 1..N over the sorted file list.
    assert image_ids(paths, "index") == ["0003", "0002", "0001"]
    assert image_ids(paths, "index", width=0, start=0) == ["2", "1", "0"]
    with pytest.raises(FinetuneError, match="share the Id 'a'.*--id-format name"):
        image_ids([tmp_path / "a.jpg", tmp_path / "a.png"])
    with pytest.raises(FinetuneError, match="stem, name, index"):
        image_ids(paths, "number")


def test_sample_submission_sets_order_columns_and_must_match(trained, tmp_path):
    root, ckpt, _, _ = trained
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,Label\n0004,x\n0001,x\n0006,x\n0002,x\n0005,x\n0003,x\n")
    out = predict(ckpt, root / "test", out=tmp_path / "sub.csv", submission=SubmissionOptions(sample_submission=sample),
                  inference=InferenceOptions(num_workers=0), log=quiet)
    table = rows(out)
    assert table[0] == ["ImageId", "Label"]
    assert [r[0] for r in table[1:]] == ["0004", "0001", "0006", "0002", "0005", "0003"]
    assert dict(table[1:])["0001"] == "red"

    unpadded = tmp_path / "unpadded.csv"
    unpadded.write_text("Id,Category\n" + "".join(f"{i},x\n" for i in range(1, 7)))
    with pytest.raises(FinetuneError, match=r"6 Id\(s\) in the sample have no image.*'1'.*'0001'.*"
                                            r"--id-format index --id-width 0 --index-start 1"):
        predict(ckpt, root / "test", out=tmp_path / "bad.csv", submission=SubmissionOptions(sample_submission=unpadded),
                inference=InferenceOptions(num_workers=0), log=quiet)
    assert not (tmp_path / "bad.csv").exists()
    out = predict(ckpt, root / "test", out=tmp_path / "idx.csv",
                  submission=SubmissionOptions(sample_submission=unpadded, id_format="index", id_width=0),
                  inference=InferenceOptions(num_workers=0), log=quiet)
    assert [r[0] for r in rows(out)[1:]] == ["1", "2", "3", "4", "5", "6"]

    short = tmp_path / "short.csv"
    short.write_text("Id,Category\n0001,x\n0002,x\n0099,x\n")
    with pytest.raises(FinetuneError, match=r"'0099'.*4 image Id\(s\) are not in the sample.*'0003'"):
        predict(ckpt, root / "test", out=tmp_path / "bad.csv", submission=SubmissionOptions(sample_submission=short),
                inference=InferenceOptions(num_workers=0), log=quiet)


def test_sample_submission_with_class_columns_gets_probabilities(trained, tmp_path):
    root, ckpt, _, _ = trained
    sample = tmp_path / "sample.csv"
    sample.write_text("Id,red,green,blue\n" + "".join(f"{i:04d},0,0,0\n" for i in range(1, 7)))
    table = rows(predict(ckpt, root / "test", out=tmp_path / "sub.csv",
                         submission=SubmissionOptions(sample_submission=sample),
                         inference=InferenceOptions(num_workers=0), log=quiet))
    assert table[0] == ["Id", "red", "green", "blue"]
    values = np.array([[float(v) for v in r[1:]] for r in table[1:]])
    expected = manual_probs(ckpt, sorted((root / "test").iterdir()))[:, [2, 1, 0]]  # classes are blue, green, red
    np.testing.assert_allclose(values, expected, atol=1e-4)


def test_tta_flip_averages_the_image_and_its_mirror(trained, tmp_path):
    root, ckpt, _, _ = trained
    paths = sorted((root / "test").iterdir())
    out = predict(ckpt, root / "test", out=tmp_path / "sub.csv", submission=SubmissionOptions(probs=True),
                  inference=InferenceOptions(num_workers=0, tta="flip"), log=quiet)
    got = np.array([[float(v) for v in r[1:]] for r in rows(tmp_path / "sub_probs.csv")[1:]])
    np.testing.assert_allclose(got, manual_probs(ckpt, paths, flip=True), atol=1e-5)
    assert not np.allclose(got, manual_probs(ckpt, paths), atol=1e-4)
    assert out.is_file()


def test_tta_crops_uses_more_views_and_bad_choices_are_named(trained, tmp_path):
    root, ckpt, _, _ = trained
    plain = predict(ckpt, root / "test", out=tmp_path / "a.csv", submission=SubmissionOptions(probs=True),
                    inference=InferenceOptions(num_workers=0), log=quiet)
    crops = predict(ckpt, root / "test", out=tmp_path / "b.csv", submission=SubmissionOptions(probs=True),
                    inference=InferenceOptions(num_workers=0, tta="crops,flip"), log=quiet)
    a = np.array([[float(v) for v in r[1:]] for r in rows(tmp_path / "a_probs.csv")[1:]])
    b = np.array([[float(v) for v in r[1:]] for r in rows(tmp_path / "b_probs.csv")[1:]])
    assert not np.allclose(a, b, atol=1e-4)
    assert [r[1] for r in rows(plain)] == [r[1] for r in rows(crops)]  # easy data: same answers
    assert parse_tta("flip, crops") == ("flip", "crops") and parse_tta("none") == ()
    with pytest.raises(FinetuneError, match="flip, crops"):
        parse_tta("flip,rotate")


def test_ensemble_averages_probabilities_and_needs_the_same_classes(trained, tmp_path):
    root, ckpt, other, tmp = trained
    paths = sorted((root / "test").iterdir())
    predict([ckpt, other], root / "test", out=tmp_path / "ens.csv", submission=SubmissionOptions(probs=True),
            inference=InferenceOptions(num_workers=0), log=quiet)
    got = np.array([[float(v) for v in r[1:]] for r in rows(tmp_path / "ens_probs.csv")[1:]])
    expected = (manual_probs(ckpt, paths) + manual_probs(other, paths)) / 2
    np.testing.assert_allclose(got, expected, atol=1e-5)

    payload = read_checkpoint(other)
    payload["classes"] = ["blue", "green", "purple"]
    mismatched = tmp_path / "mismatched.pt"
    save_checkpoint(mismatched, {k: v for k, v in payload.items() if k not in ("format", "versions")})
    with pytest.raises(FinetuneError, match=r"class lists differ.*\['purple', 'red'\]"):
        predict([ckpt, mismatched], root / "test", out=tmp_path / "x.csv", inference=InferenceOptions(num_workers=0),
                log=quiet)


def test_unreadable_image_still_gets_a_row_and_is_listed(trained, tmp_path):
    root, ckpt, _, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((root / "test").iterdir())[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "0004.jpg").write_bytes(b"not a jpeg")
    out = predict(ckpt, images, out=tmp_path / "sub.csv", inference=InferenceOptions(num_workers=0, tta="flip"),
                  log=quiet)
    assert [r[0] for r in rows(out)[1:]] == ["0001", "0002", "0003", "0004"]
    listed = rows(tmp_path / "sub_unreadable.csv")
    assert len(listed) == 2 and listed[1][0].endswith("0004.jpg")
    # Fixed and predicted again: the earlier list would name an image this submission scored, so it goes.
    (images / "0004.jpg").write_bytes((root / "test" / "0004.jpg").read_bytes())
    said: list[str] = []
    predict(ckpt, images, out=tmp_path / "sub.csv", inference=InferenceOptions(num_workers=0), log=said.append)
    assert not (tmp_path / "sub_unreadable.csv").exists()
    assert any("removed the earlier" in line and "every image was read" in line for line in said)


def test_a_failed_run_leaves_no_partial_submission(tmp_path):
    plan = SubmissionPlan(["1", "2", "3", "4"], [tmp_path / f"{i}.jpg" for i in range(4)])

    def batches():
        yield np.array([[0.9, 0.1], [0.2, 0.8]])
        raise RuntimeError("out of memory in batch 2")

    with pytest.raises(RuntimeError):
        write_rows(plan, batches(), ["a", "b"], SubmissionFiles(tmp_path / "sub.csv", tmp_path / "p.csv"), SubmissionOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _traced_peak(checkpoint: Path, images: Path, out: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        predict(checkpoint, images, out=out, submission=SubmissionOptions(probs=True, topk=3),
                inference=InferenceOptions(num_workers=0, batch_size=16, device="cpu"), log=quiet)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_number_of_images_grows(tmp_path):
    classes = [f"class{i:04d}" for i in range(3000)]
    checkpoint = untrained_checkpoint(tmp_path / "wide.pt", classes)
    rng = np.random.default_rng(0)
    folders = {}
    for n in (20, 80):
        folders[n] = tmp_path / f"images{n}"
        folders[n].mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folders[n] / f"{i:05d}.png")
    _traced_peak(checkpoint, folders[20], tmp_path / "warmup.csv")  # first-call imports and caches
    small = _traced_peak(checkpoint, folders[20], tmp_path / "small.csv")
    large = _traced_peak(checkpoint, folders[80], tmp_path / "large.csv")
    assert len(rows(tmp_path / "large_probs.csv")) == 81
    # Holding every probability would add 60 images x 3000 classes x 4 bytes = 720 kB (twice that while
    # concatenating); streaming adds only per-image bookkeeping (paths, Ids: well under 1 kB each).
    held = 60 * len(classes) * 4
    assert large - small < 0.3 * held, f"peak grew by {large - small} bytes for 60 more images"


def test_cli_predict_with_ensemble_tta_and_errors(trained, tmp_path, capsys):
    root, ckpt, other, _ = trained
    out = tmp_path / "cli.csv"
    assert main(["predict", str(ckpt), str(other), "--images", str(root / "test"), "--out", str(out),
                 "--tta", "flip", "--topk", "2", "--id-format", "index", "--workers", "0"]) == 0
    assert [r[0] for r in rows(out)[1:]] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    assert (tmp_path / "cli_top2.csv").is_file()
    assert main(["predict", str(ckpt), "--images", str(root / "test"), "--out", str(out), "--topk", "9"]) == 2
    assert "--topk must be between 1 and the number of classes (3)" in capsys.readouterr().err
