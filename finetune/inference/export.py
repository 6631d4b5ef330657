"""Export a checkpoint to ONNX or TorchScript and check the exported model against PyTorch.

The exported model maps a normalised N×3×S×S float batch to logits; the JSON written next to it
holds the class names and the preprocessing (size, mean, std) a deployment has to reproduce.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from finetune.engine.files import check_writable, temporary_path
from finetune.errors import FinetuneError
from finetune.inference.predict import LoadedModel, load_model
from finetune.inference.quantize import QuantizeCheck, QuantizeInputs, quantize_int8
from finetune.outputs.run_dir import check_output

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_model"]

EXPORT_FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'finetune[export]'"


@dataclass
class ExportResult:
    """Where the exported model and its metadata went, and how closely it reproduces PyTorch."""

    path: Path
    metadata: Path
    format: str
    max_abs_diff: float


def _example(loaded: LoadedModel, batch: int, seed: int) -> torch.Tensor:
    size = loaded.preprocessing.size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _export_torchscript(loaded: LoadedModel, out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with warnings.catch_warnings():
        # PyTorch >= 2.9 marks TorchScript deprecated; the user asked for it explicitly, ONNX is the alternative.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(loaded.model, _example(loaded, 2, 0), check_trace=False)
        torch.jit.save(traced, str(out))
        restored = torch.jit.load(str(out), map_location="cpu")
    return lambda x: restored(x).detach().numpy()


def _onnx_modules() -> tuple:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise FinetuneError(f"{ONNX_HINT} (missing: {err.name})") from None
    return onnx, onnxruntime


def _export_onnx(loaded: LoadedModel, out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    onnx, onnxruntime = _onnx_modules()
    batch = torch.export.Dim("batch", min=1, max=4096)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(loaded.model, (_example(loaded, 2, 0),), str(out), dynamo=True, external_data=False,
                              input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    except Exception as err:  # the exporter raises many types; the model's name is what the user needs
        raise FinetuneError(
            f"ONNX export of {loaded.recipe.model.backbone} failed: {str(err).splitlines()[0][:300]}; "
            "try --format torchscript"
        ) from None
    proto = onnx.load(str(out))
    for key, value in (("classes", json.dumps(loaded.classes)),
                       ("preprocessing", json.dumps(loaded.preprocessing.to_dict()))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})[0]


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds the model's code; a checkpoint (also a torch zip) does not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_export_metadata(path: Path) -> bool:
    try:
        return "max_abs_diff" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


# What counts as an earlier export of each format, which --out may replace without --force.
_EARLIER: dict[str, Callable[[Path], bool]] = {
    "onnx": lambda path: path.suffix.lower() == ".onnx",
    "torchscript": _is_torchscript,
}


def export_model(
    checkpoint: Union[str, Path],
    fmt: str = "onnx",
    out: Optional[Union[str, Path]] = None,
    tolerance: float = 1e-3,
    log: Callable[[str], None] = print,
    force: bool = False,
    quantize: Optional[Callable[[LoadedModel], QuantizeInputs]] = None,
) -> ExportResult:
    """Export `checkpoint` as ONNX or TorchScript, then fail unless its logits match PyTorch's within `tolerance`.

    `out` is never the checkpoint itself; an existing file that is not an earlier export of the same
    format is replaced only with `force`. With `quantize`, the ONNX model is quantized to int8 on its
    calibration images and kept only if it decides its check images like the fp32 model.

    Args:
        checkpoint: a run's checkpoint.
        fmt: the format to write.
        out: output file (None: next to the checkpoint).
        tolerance: largest allowed difference between exported and PyTorch logits.
        log: where progress lines go.
        force: replace an existing out file that is not an earlier export of this format (never the checkpoint).
        quantize: gives the images to calibrate and check an int8 model on (ONNX only); None: float32.
    """
    if fmt not in EXPORT_FORMATS:
        raise FinetuneError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if quantize is not None and fmt != "onnx":
        raise FinetuneError("--quantize int8 needs --format onnx (onnxruntime quantizes ONNX models)")
    if fmt == "onnx":
        _onnx_modules()  # fail before the slow part when the packages are missing
    checkpoint = Path(checkpoint).expanduser()
    suffix = ".int8.onnx" if quantize is not None else SUFFIXES[fmt]
    out = Path(out).expanduser() if out else checkpoint.with_name(checkpoint.stem + suffix)
    metadata = out.with_name(out.name + ".json")
    replaced = [path for path, earlier in ((out, _EARLIER[fmt]), (metadata, _is_export_metadata))
                if check_output(path, [checkpoint], f"{fmt} export", earlier, force)]
    check_writable(out.parent, "choose an --out in a folder you can write to")
    loaded = load_model(checkpoint, "cpu")
    loaded.model.float().eval()
    # The fp32 model quantize_int8 reads: a temporary beside `out` (a killed run's is cleared by the next).
    written = temporary_path(out) if quantize is not None else out
    inputs = quantize(loaded) if quantize is not None else None
    try:
        diff = _export_checked(loaded, fmt, written, tolerance)
        int8 = None if inputs is None else quantize_int8(written, out, loaded, inputs)
    finally:
        if written != out:
            written.unlink(missing_ok=True)
    metadata.write_text(json.dumps({
        "format": fmt, "checkpoint": str(checkpoint), "input": "input: float32 N x 3 x H x W, normalised",
        "output": "logits: N x classes (apply softmax for probabilities)", "classes": loaded.classes,
        "preprocessing": loaded.preprocessing.to_dict(), "max_abs_diff": diff,
        **({"quantize": "int8", "int8_check": int8.to_dict()} if int8 else {}),
    }, indent=2) + "\n")
    log(f"exported {fmt} model to {out} (classes and preprocessing in {metadata.name}); "
        f"max abs difference from PyTorch {diff:.2e} on a batch of 3" + ("" if int8 is None else
        f" before int8; {describe_check(int8)}, calibrated on {int8.calibration_images} images of {inputs.source}"))
    for path in replaced:
        log(f"note: replaced the earlier {path}")
    return ExportResult(out, metadata, fmt, diff)


def describe_check(check: QuantizeCheck) -> str:
    """One line: how the int8 model compares with fp32."""
    text = (f"int8 decides {check.agreement:.1%} of {check.check_images} held-out images like fp32 "
            f"(largest probability difference {check.max_prob_diff:.3f})")
    if check.accuracy_fp32 is not None:
        text += f", accuracy {check.accuracy_int8:.4f} int8 vs {check.accuracy_fp32:.4f} fp32"
    return text


def _export_checked(loaded: LoadedModel, fmt: str, out: Path, tolerance: float) -> float:
    """Write the export and return its largest logit difference from PyTorch; FinetuneError beyond `tolerance`."""
    with torch.no_grad():
        run = _export_torchscript(loaded, out) if fmt == "torchscript" else _export_onnx(loaded, out)
        # A batch size and values the export never saw: catches a batch size baked into the graph.
        check = _example(loaded, 3, 1)
        expected = loaded.model(check).numpy()
        try:
            got = run(check)
        except Exception as err:  # runtime errors of the exported graph come in many types
            raise FinetuneError(f"the exported {fmt} model does not run on a batch of 3: {str(err)[:300]}") from None
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= tolerance:
        raise FinetuneError(
            f"the exported {fmt} model's outputs differ from PyTorch's by up to {diff:.3g} (tolerance {tolerance:g}; "
            f"shapes {got.shape} vs {expected.shape}); do not deploy {out}"
        )
    return diff
