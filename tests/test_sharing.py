"""export --format timm: a folder plain timm loads (finetune not importable) that reproduces `finetune predict`'s
probabilities, its model card, the portable preprocessing, and clear errors for what it cannot carry."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_OVERRIDES, write_folder_dataset
from finetune import train
from finetune.cli import main
from finetune.data import portable
from finetune.data.images import load_rgb
from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import build_eval_transform
from untrained import untrained_checkpoint

quiet = lambda line: None  # noqa: E731


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs on the colour data: an MLP head (hidden 16, BatchNorm, dropout) and a plain Linear head;
    a test folder with PNGs and a large JPEG (decoded at reduced scale)."""
    tmp = tmp_path_factory.mktemp("sharing")
    root = write_folder_dataset(tmp / "colours", per_class=10, val_per_class=3, test=6)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)).save(root / "test" / "big.jpg", quality=90)
    made = {}
    for name, head in (("mlp", ["model.head.hidden=[16]", "model.head.dropout=0.3"]),
                       ("linear", ["model.head.hidden=[]"])):
        result = train(None, data=root, overrides=TINY_OVERRIDES + head + [f"output={tmp / 'runs'}", f"name={name}"],
                       log=quiet)
        made[name] = result.best_checkpoint
    return made, root


def _card_code(folder: Path, images: list[Path], dump: Path) -> str:
    """The model card's python block, pointed at `folder` and `images`, dumping its probabilities to `dump`."""
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('folder = "."', f"folder = {str(folder)!r}")
    code = code.replace('images = ["photo.jpg"]', f"images = {[str(p) for p in images]!r}")
    blocker = "import sys\nsys.modules['finetune'] = None  # as on a machine without finetune\n"
    return blocker + code + f"\njson.dump(probs.tolist(), open({str(dump)!r}, 'w'))\n"


def _predict_probs(checkpoint: Path, images: Path, out: Path) -> tuple[list[str], np.ndarray]:
    assert main(["predict", str(checkpoint), "--images", str(images), "--out", str(out), "--probs"]) == 0
    with out.with_name(out.stem + "_probs.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_timm_folder_reproduces_predict_without_finetune(runs, head, tmp_path, capsys):
    checkpoints, root = runs
    folder = tmp_path / "shared"
    assert main(["export", str(checkpoints[head]), "--format", "timm", "--out", str(folder)]) == 0
    said = capsys.readouterr().out
    assert ("in timm's classifier" in said) == (head == "linear") and "largest logit difference" in said
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocess.py", "README.md"} <= names
    assert ("head.safetensors" in names) == (head == "mlp")
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))]  # no pickle
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["blue", "green", "red"]
    ids, expected = _predict_probs(checkpoints[head], root / "test", tmp_path / "sub.csv")
    images = sorted((root / "test").iterdir())
    assert [p.stem for p in images] == ids
    dump = tmp_path / "probs.json"
    script = tmp_path / "use.py"
    script.write_text(_card_code(folder, images, dump))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(dump.read_text()))
    assert np.abs(got - expected).max() <= 1e-4
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and "## Intended use and limits" in card
    assert "**Validation**" in card and "![confusion matrix](validation_confusion.png)" in card
    assert (folder / "validation_confusion.png").is_file() and "name: " + head in card  # the run's recipe


def test_portable_preprocessing_matches_the_evaluation_transform(tmp_path):
    rng = np.random.default_rng(3)
    images = {
        "small.png": Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L"),
        "wide.jpg": Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)),
        "palette.png": Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert("P"),
        "alpha.png": Image.fromarray(rng.integers(0, 255, (64, 40, 4), dtype=np.uint8), "RGBA"),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (45, 45), dtype=np.uint16)),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).convert("CMYK"),
    }
    for pre in (Preprocessing(size=32, crop_pct=0.875), Preprocessing(size=96, crop_pct=1.0, interpolation="bicubic",
                                                                      mean=(0.5,) * 3, std=(0.5,) * 3)):
        evaluate = build_eval_transform(pre)
        for name, image in images.items():
            path = tmp_path / name
            image.save(path)
            side = portable.resize_side(pre.size, pre.crop_pct)
            expected = evaluate(image=load_rgb(path, min_side=side))["image"].numpy()
            got = portable.load(path, pre.to_dict())
            assert got.shape == expected.shape == (3, pre.size, pre.size)
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_portable_module_imports_nothing_from_finetune():
    source = Path(portable.__file__).read_text()
    assert not re.search(r"^\s*(from|import) finetune", source, re.M)


@pytest.mark.parametrize("backbone", ["tv/resnet18", "lenet"])
def test_timm_format_names_what_it_cannot_carry(backbone, tmp_path, capsys):
    checkpoint = untrained_checkpoint(tmp_path / "run" / "best.pt", ["a", "b"], backbone=backbone, size=32)
    assert main(["export", str(checkpoint), "--format", "timm", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--format timm needs a timm backbone" in err and "onnx or torchscript" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_push_to_hub_offline_fails_fast_before_writing(runs, tmp_path, capsys, monkeypatch):
    import finetune.workflows.sharing as sharing

    monkeypatch.setattr(sharing, "host_reachable", lambda host: False)
    checkpoints, _ = runs
    out = tmp_path / "shared"
    assert main(["export", str(checkpoints["linear"]), "--format", "timm", "--out", str(out),
                 "--push-to-hub", "someone/colours"]) == 2
    err = capsys.readouterr().err
    assert "huggingface.co is unreachable" in err and "Traceback" not in err and not out.exists()
    assert main(["export", str(checkpoints["linear"]), "--push-to-hub", "someone/colours"]) == 2
    assert "add --format timm" in capsys.readouterr().err


def test_timm_out_is_refused_when_it_holds_other_files(runs, tmp_path, capsys):
    checkpoints, _ = runs
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(checkpoints["linear"]), "--format", "timm", "--out", str(out)]) == 2
    assert "holds other files" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    for _ in range(2):  # an earlier timm export is replaced without --force
        assert main(["export", str(checkpoints["linear"]), "--format", "timm", "--out", str(again)]) == 0
