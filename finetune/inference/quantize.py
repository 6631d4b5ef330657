"""A small, fast CPU model: onnxruntime's static int8 quantization of an exported ONNX model, calibrated on
training images and checked against the fp32 model on held-out images before it is kept.

Static (not dynamic) quantization because a CNN's time goes into convolutions, which dynamic quantization
leaves in float; QDQ format, per-channel int8 weights and uint8 activations: what onnxruntime recommends for
x86 CPUs. Without VNNI (8-bit dot products) the weights use 7 bits (`reduce_range`) so the 16-bit
accumulators of the older instructions cannot saturate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from finetune.config.recipe import TASK_ACTIVATIONS
from finetune.data.loaders import make_loader
from finetune.data.preprocessing import Preprocessing
from finetune.data.sources import Sample
from finetune.engine.files import replace_atomically, temporary_path
from finetune.errors import FinetuneError
from finetune.inference.predict import LoadedModel, images_dataset

__all__ = ["INT8_MIN_AGREEMENT", "QUANTIZE_CHOICES", "QuantizeCheck", "QuantizeInputs", "quantize_int8"]

QUANTIZE_CHOICES = ("int8",)
# The share of held-out images on which int8 and fp32 must make the same decision; below it the int8 file is
# removed (quantization broke the model: a layer with outliers, too few calibration images).
INT8_MIN_AGREEMENT = 0.9
BATCH = 32


@dataclass(frozen=True)
class QuantizeInputs:
    """Images to calibrate on (any, unlabelled) and to check on (labelled when the run's validation set is used)."""

    calibration: Sequence[Path]
    check: Sequence[Sample]
    source: str  # where they came from, for the log


@dataclass(frozen=True)
class QuantizeCheck:
    """How the int8 model compares with fp32 on the check images."""

    calibration_images: int
    check_images: int
    agreement: float  # share of images (multi-label: of image-class decisions) decided alike
    max_prob_diff: float
    accuracy_fp32: Optional[float]  # when the check images are labelled (one label per image)
    accuracy_int8: Optional[float]

    def to_dict(self) -> dict:
        """Plain types, for the export's JSON."""
        return asdict(self)


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave full range; onnxruntime's own default
    return "vnni" in flags


def preprocessed(pre: Preprocessing, paths: Sequence[Path]) -> Iterator[np.ndarray]:
    """Batches of `paths` as the model sees them at evaluation (decode, resize, centre crop, normalise)."""
    for (views,), _reasons in make_loader(images_dataset(paths, pre), BATCH, 0):  # one view: no TTA
        yield views.numpy()


class _Reader:
    """onnxruntime's CalibrationDataReader: one batch per call, then None."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = batches

    def get_next(self) -> Optional[dict]:
        """The next calibration batch, or None when done."""
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def _decisions(probs: np.ndarray, activation: str) -> np.ndarray:
    return probs.argmax(1) if activation == "softmax" else probs >= 0.5


def _probs(run: Callable[[np.ndarray], np.ndarray], pre: Preprocessing, paths: Sequence[Path],
           activation: str, temperature: float) -> np.ndarray:
    logits = torch.from_numpy(np.concatenate([run(batch) for batch in preprocessed(pre, paths)])) / temperature
    return (logits.softmax(1) if activation == "softmax" else logits.sigmoid()).numpy()


def compare(fp32: Callable, int8: Callable, loaded: LoadedModel, check: Sequence[Sample], activation: str,
            calibrated: int) -> QuantizeCheck:
    """fp32 against int8 on the check images: agreement, largest probability difference, accuracy if labelled."""
    paths = [s.path for s in check]
    p32, p8 = (_probs(run, loaded.preprocessing, paths, activation, loaded.temperature) for run in (fp32, int8))
    d32, d8 = _decisions(p32, activation), _decisions(p8, activation)
    labels = [s.target for s in check]
    labelled = activation == "softmax" and all(isinstance(t, int) for t in labels)
    accuracy = (lambda d: float(np.mean(d == np.array(labels)))) if labelled else (lambda d: None)
    return QuantizeCheck(calibrated, len(paths), float(np.mean(d32 == d8)), float(np.abs(p32 - p8).max()),
                         accuracy(d32), accuracy(d8))


def quantize_int8(fp32_path: Path, out: Path, loaded: LoadedModel, inputs: QuantizeInputs) -> QuantizeCheck:
    """Write the int8 model of the ONNX file `fp32_path` to `out`; refuse it (not written, FinetuneError) when it
    decides fewer than INT8_MIN_AGREEMENT of the check images like fp32."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not inputs.calibration:
        raise FinetuneError(f"no images to calibrate the int8 model on in {inputs.source}; pass --calibration DIR")
    prepared, staged = temporary_path(out), temporary_path(out)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
            # Shape inference and graph optimisation (BatchNorm folded) first, as onnxruntime recommends.
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(str(prepared), str(staged),
                            _Reader(preprocessed(loaded.preprocessing, inputs.calibration)),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=not _has_vnni(),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                    for p in (fp32_path, staged)]
        runs = [lambda x, s=s: s.run(None, {"input": x})[0] for s in sessions]
        check = compare(*runs, loaded, inputs.check or [Sample(p) for p in inputs.calibration],
                        TASK_ACTIVATIONS[loaded.task_name], len(inputs.calibration))
        if check.agreement < INT8_MIN_AGREEMENT:
            raise FinetuneError(
                f"the int8 model decides only {check.agreement:.1%} of {check.check_images} check images like "
                f"fp32 (at least {INT8_MIN_AGREEMENT:.0%} needed); not written. Try more calibration images "
                "(--calibration DIR with a few hundred training images) or keep the fp32 export"
            )
        replace_atomically(staged, out)
    finally:
        prepared.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    return check
