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
