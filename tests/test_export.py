"""export: ONNX and TorchScript files that reproduce PyTorch's outputs, and clear errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from finetune import FinetuneError, load_model
from finetune.cli import main
from finetune.inference.export import export_model
from untrained import untrained_checkpoint

quiet = lambda line: None  # noqa: E731
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Hidden layer with BatchNorm and dropout: both must be in inference mode in the export.
    return untrained_checkpoint(tmp_path_factory.mktemp("export") / "run" / "best.pt", CLASSES,
                                overrides=["model.head.hidden=[16]", "model.head.dropout=0.5"])


def batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated")
def test_cli_torchscript_export_matches_pytorch(checkpoint, capsys):
    assert main(["export", str(checkpoint), "--format", "torchscript"]) == 0
    assert "max abs difference from PyTorch" in capsys.readouterr().out
    path = checkpoint.with_suffix(".torchscript.pt")  # default: next to the checkpoint
    scripted = torch.jit.load(str(path))
    x = batch(5, 7)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), load_model(checkpoint).model(x).numpy(), atol=1e-5)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["classes"] == CLASSES and meta["preprocessing"]["size"] == 32 and meta["max_abs_diff"] < 1e-5


def test_export_fails_when_outputs_are_off_and_on_bad_format(checkpoint, tmp_path):
    # A negative tolerance can never be met: the comparison must run and refuse.
    with pytest.raises(FinetuneError, match="differ from PyTorch's by up to"):
        export_model(checkpoint, "torchscript", out=tmp_path / "m.pt", tolerance=-1.0, log=quiet)
    with pytest.raises(FinetuneError, match="onnx, torchscript"):
        export_model(checkpoint, "tflite", log=quiet)


def test_onnx_without_its_packages_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(FinetuneError, match=r"pip install 'finetune\[export\]'"):
        export_model(checkpoint, "onnx", out=tmp_path / "m.onnx", log=quiet)


def test_onnx_export_matches_pytorch_on_any_batch_size(checkpoint, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime ([export] extra)")
    onnx = pytest.importorskip("onnx")
    result = export_model(checkpoint, "onnx", out=tmp_path / "model.onnx", log=quiet)
    assert result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = batch(7, 3)
    with torch.no_grad():
        expected = load_model(checkpoint).model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short run on the colour data (classes a model tells apart after 2 epochs), its data kept for calibration."""
    from conftest import TINY_OVERRIDES, write_folder_dataset
    from finetune import train

    tmp = tmp_path_factory.mktemp("int8")
    root = write_folder_dataset(tmp / "colours", per_class=12, val_per_class=4, test=6)
    result = train(None, data=root, overrides=TINY_OVERRIDES + [f"output={tmp / 'runs'}"], log=quiet)
    return result.best_checkpoint, root


def test_cli_int8_export_is_smaller_and_decides_like_fp32(trained_run, capsys, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="int8 export needs the [export] extra")
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    checkpoint, root = trained_run
    # Default calibration: the run's own training images, checked on its validation images.
    assert main(["export", str(checkpoint), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 36 images of the run's training data" in out and "like fp32" in out
    int8 = checkpoint.with_name("best.int8.onnx")
    meta = json.loads(int8.with_name(int8.name + ".json").read_text())
    check = meta["int8_check"]
    assert meta["quantize"] == "int8" and check["check_images"] == 12 and check["agreement"] >= 0.9
    assert abs(check["accuracy_int8"] - check["accuracy_fp32"]) <= 0.1
    fp32 = export_model(checkpoint, "onnx", out=tmp_path / "fp32.onnx", log=quiet).path
    assert int8.stat().st_size < 0.6 * fp32.stat().st_size  # int8 weights: about a quarter of float32's
    assert {op.op_type for op in __import__("onnx").load(str(int8)).graph.node} >= {"QuantizeLinear",
                                                                                    "DequantizeLinear"}
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": batch(2, 0).numpy()})[0].shape == (2, 3)
    assert not list(checkpoint.parent.glob("*.tmp"))  # the fp32 and prepared temporaries are gone
    # An explicit folder (any depth, labels ignored) works too, and says where the images came from.
    assert main(["export", str(checkpoint), "--quantize", "int8", "--calibration", str(root / "test"),
                 "--out", str(tmp_path / "small.onnx")]) == 0
    assert f"calibrated on 6 images of {root / 'test'}" in capsys.readouterr().out


def test_int8_export_errors_are_one_line(trained_run, capsys, tmp_path):
    checkpoint, root = trained_run
    assert main(["export", str(checkpoint), "--format", "torchscript", "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--calibration", str(root)]) == 2
    assert "--calibration is for --quantize int8" in capsys.readouterr().err
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    moved = tmp_path / "elsewhere.pt"
    moved.write_bytes(checkpoint.read_bytes())
    payload = torch.load(moved, weights_only=False)
    payload["recipe"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(payload, moved)
    assert main(["export", str(moved), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "is not here to calibrate the int8 model on; pass --calibration DIR" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(moved), "--quantize", "int8", "--calibration", str(empty)]) == 2
    assert "no images to calibrate the int8 model on" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.int8.onnx").exists()
