"""Self-contained checkpoints: weights, classes, preprocessing, recipe and versions; atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

from finetune.engine.files import replace_atomically, temporary_path
from finetune.errors import FinetuneError
from finetune.version import __version__

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "read_checkpoint", "library_versions"]

CHECKPOINT_FORMAT = "finetune-checkpoint-v1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint was made with."""
    import timm
    import torchvision

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"finetune": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "timm": str(timm.__version__)}


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "versions": library_versions(), **payload}
    tmp = temporary_path(path)
    try:
        torch.save(payload, tmp)
        replace_atomically(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a finetune checkpoint safely (weights_only) and check it is one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise FinetuneError(f"{path} is empty (0 bytes), not a readable checkpoint; use a run's best or last "
                            "checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or foreign pickles raise many types
        text = str(err)
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        if "weights_only" in text:  # torch's advice to load it unsafely must never reach a user
            detail = "it holds something other than tensors and plain values, or is not a checkpoint at all"
        raise FinetuneError(f"{path} is not a readable checkpoint: {detail}; use a run's best or last "
                            "checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(
            f"{path} is not a finetune checkpoint (use a best or last checkpoint from a run folder; "
            "plain weights go in the recipe's model.weights)"
        )
    return payload
