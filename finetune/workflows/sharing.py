"""Hand a trained model on: `finetune export` (ONNX, TorchScript, int8 ONNX calibrated on the run's images, a timm
model folder with its model card, uploaded to the Hugging Face hub when asked)."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from finetune.data.images import list_images
from finetune.data.prepare import discover_splits, openable
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.engine.files import check_writable
from finetune.inference.export import EXPORT_FORMATS, ExportResult, export_model
from finetune.inference.predict import LoadedModel, load_model
from finetune.inference.quantize import QUANTIZE_CHOICES, QuantizeInputs
from finetune.inference.timm_folder import check_timm_backbone, write_timm_folder
from finetune.models.weights import host_reachable
from finetune.outputs.model_card import CardFacts, write_model_card
from finetune.outputs.run_dir import RunDir
from finetune.tasks import task_of_model
from finetune.version import __version__

__all__ = ["CALIBRATION_IMAGES", "FORMATS", "export", "export_timm", "quantize_inputs"]

CALIBRATION_IMAGES = 300  # onnxruntime's MinMax ranges settle within a few hundred images
CHECK_IMAGES = 500  # held-out images the int8 model is compared with fp32 on
FORMATS = (*EXPORT_FORMATS, "timm")


def quantize_inputs(loaded: LoadedModel, calibration: Optional[Path] = None, count: int = CALIBRATION_IMAGES,
                    seed: int = 0) -> QuantizeInputs:
    """A seeded sample of `count` images to calibrate on and others to check on: from the folder `calibration`
    (any depth, labels ignored), else the run's own training images, checked on its validation images."""
    rng = random.Random(seed)
    if calibration is not None:
        paths = list_images(calibration, recursive=True)
        rng.shuffle(paths)
        return QuantizeInputs(paths[:count], [Sample(p) for p in paths[count:count + CHECK_IMAGES]],
                              str(calibration))
    recipe = loaded.recipe
    root = Path(recipe.data.root).expanduser() if recipe.data.root else None
    if root is None or not root.is_dir():
        raise FinetuneError(f"the run's training data ({root or 'not recorded in the checkpoint'}) is not here to "
                            "calibrate the int8 model on; pass --calibration DIR (a few hundred training images)")
    splits = discover_splits(recipe.data, task_of_model(loaded), recipe.train.seed, openable)
    train = [s.path for s in splits.train]
    rng.shuffle(train)
    return QuantizeInputs(train[:count], splits.val[:CHECK_IMAGES], f"the run's training data ({root})")


def export(
    checkpoint: Union[str, Path],
    fmt: str = "onnx",
    out: Optional[Union[str, Path]] = None,
    quantize: Optional[str] = None,
    calibration: Optional[Union[str, Path]] = None,
    push_to_hub: Optional[str] = None,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> ExportResult:
    """Export `checkpoint` for use without finetune: ONNX or TorchScript (checked against PyTorch), an int8 ONNX
    model (`quantize="int8"`: calibrated on training images, checked against fp32), or a timm model folder with a
    model card (`fmt="timm"`, optionally uploaded to the Hugging Face hub).

    Args:
        checkpoint: a run's checkpoint.
        fmt: onnx, torchscript or timm.
        out: output file, or folder for timm (None: next to the checkpoint; best.onnx, best.int8.onnx,
            best.torchscript.pt, timm_model/).
        quantize: int8 for onnxruntime's static quantization; None: float32.
        calibration: folder of images to calibrate int8 on (default: the run's training data, if still there).
        push_to_hub: with --format timm, also upload the folder to this Hugging Face repo (user/name).
        log: where progress lines go.
        force: replace an existing out that is not an earlier export of this format (never the checkpoint).
    """
    if fmt not in FORMATS:
        raise FinetuneError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise FinetuneError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if calibration is not None and quantize is None:
        raise FinetuneError("--calibration is for --quantize int8; add --quantize int8 or leave it out")
    if push_to_hub is not None and fmt != "timm":
        raise FinetuneError("--push-to-hub uploads a timm model folder; add --format timm")
    if fmt == "timm":
        if quantize is not None:
            raise FinetuneError("--quantize int8 needs --format onnx (onnxruntime quantizes ONNX models)")
        return export_timm(Path(checkpoint).expanduser(), out, push_to_hub, log, force)
    folder = Path(calibration).expanduser() if calibration is not None else None
    inputs = partial(quantize_inputs, calibration=folder) if quantize else None
    return export_model(checkpoint, fmt, out, log=log, force=force, quantize=inputs)


def _is_earlier_timm_folder(folder: Path) -> bool:
    try:
        return "finetune" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _check_timm_out(out: Path, checkpoint: Path, force: bool) -> None:
    """The folder must be new, empty or an earlier timm export (else --force); never the checkpoint's run folder."""
    if out.resolve() == checkpoint.parent.resolve():
        raise FinetuneError(f"--out {out} is the checkpoint's own folder; choose a new folder for the timm model")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; --format timm writes a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_earlier_timm_folder(out) and not force:
        raise FinetuneError(f"--out {out} holds other files; choose a new folder or pass --force to write into it")
    check_writable(out, "choose an --out folder you can write to")


def _hub_check(repo: str) -> None:
    """Fail fast, before the export, when the hub cannot be reached (the upload itself is huggingface_hub's)."""
    if "/" not in repo:
        raise FinetuneError(f"--push-to-hub takes a repo as user/name, got {repo!r}")
    if not host_reachable("huggingface.co"):
        raise FinetuneError(f"cannot push to {repo}: huggingface.co is unreachable (offline?). The folder is "
                            "written anyway when you leave out --push-to-hub; upload it later with "
                            "`huggingface-cli upload REPO FOLDER`")


def export_timm(checkpoint: Path, out: Optional[Union[str, Path]], push_to_hub: Optional[str],
                log: Callable[[str], None], force: bool) -> ExportResult:
    """The timm folder (weights, config, head, preprocess.py), its model card, and the upload when asked."""
    folder = Path(out).expanduser() if out else checkpoint.parent / "timm_model"
    if push_to_hub:
        _hub_check(push_to_hub)
    loaded = load_model(checkpoint, "cpu")
    check_timm_backbone(loaded)
    _check_timm_out(folder, checkpoint, force)
    written = write_timm_folder(loaded, folder, {"finetune_version": __version__})
    run = RunDir(checkpoint.parent)
    write_model_card(folder, card_facts(loaded, written.architecture, run), run if run.is_run() else None)
    where = "in timm's classifier" if written.head_in_timm else "in head.safetensors (timm has no MLP head)"
    log(f"wrote a timm model folder to {folder}: model.safetensors, config.json, the head {where}, preprocess.py "
        f"and a model card (README.md); reloaded through timm, largest logit difference {written.max_abs_diff:.2e}")
    if push_to_hub:
        _upload(folder, push_to_hub, log)
    return ExportResult(folder, folder / "config.json", "timm", written.max_abs_diff)


def card_facts(loaded: LoadedModel, architecture: str, run: RunDir) -> CardFacts:
    """What the model card states, from the checkpoint (the run folder's recipe.yaml when it is there)."""
    model = loaded.recipe.model
    weights = (f"the weights {model.weights}" if model.weights else
               "timm's pretrained weights" if model.pretrained else "random initialisation")
    recipe = run.recipe.read_text() if run.recipe.is_file() else yaml.safe_dump(loaded.recipe.to_dict())
    return CardFacts(loaded.recipe.name, architecture, loaded.classes, loaded.task_name, loaded.preprocessing.size,
                     loaded.temperature, recipe, weights, __version__)


def _upload(folder: Path, repo: str, log: Callable[[str], None]) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="finetune export --format timm")
    except Exception as err:  # network, auth and hub errors come in many types; one line says which
        raise FinetuneError(f"upload to {repo} failed: {str(err).splitlines()[0][:300]} (the folder {folder} is "
                            "complete; log in with `huggingface-cli login` and retry)") from None
    log(f"uploaded {folder} to https://huggingface.co/{repo}")
