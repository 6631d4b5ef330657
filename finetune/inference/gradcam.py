"""Grad-CAM (Selvaraju et al., 2017) on the backbone's last spatial feature map, with plain torch hooks.

Written here rather than taken from the `grad-cam` package: that package still needs the
caller to pick the target layer (the only model-specific part), and it pulls in `ttach` and
`opencv-python`, which clashes with the `opencv-python-headless` that albumentations installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.images import load_rgb
from finetune.errors import FinetuneError
from finetune.inference.predict import LoadedModel
from finetune.inference.tta import ViewTransform

__all__ = ["CamResult", "grad_cam"]


@dataclass
class CamResult:
    """The model's view of one image (uint8 HxWx3) and the class-activation heat map over it (HxW, 0..1)."""

    image: np.ndarray
    heat: np.ndarray
    layer: str


def _layer_parent(backbone: nn.Module) -> nn.Module:
    # Wrappers such as GrayscaleInput hold the real network as their only child.
    module = backbone
    while len(list(module.children())) == 1:
        module = next(module.children())
    return module


def _last_stage_channels(backbone: nn.Module, features: torch.Tensor) -> int:
    """Channels of the last stage: timm's feature_info knows them; else the pooled feature width."""
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and "num_chs" in info[-1]:
        return int(info[-1]["num_chs"])
    return int(features.shape[-1])


def _last_spatial_output(
    backbone: nn.Module, images: torch.Tensor
) -> tuple[Optional[str], Optional[torch.Tensor], torch.Tensor]:
    """Run the backbone: (last top-level layer with a spatial map, that map as N×C×H×W, the pooled features).

    No map (None) when the network works on tokens after its last map: Grad-CAM on a vision
    transformer's patch embedding would look meaningful without being so.
    """
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [
        child.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.append((name, out)) if isinstance(out, torch.Tensor) else None
        )
        for name, child in _layer_parent(backbone).named_children()
    ]
    try:
        features = backbone(images)
    finally:
        for hook in hooks:
            hook.remove()
    width = _last_stage_channels(backbone, features)
    for k in range(len(outputs) - 1, -1, -1):
        name, out = outputs[k]
        if out.dim() == 3:
            return None, None, features
        if out.dim() == 4:
            # Channels-last maps (Swin, MambaOut stages) end in the channel count; make them N×C×H×W.
            if out.shape[-1] == width and out.shape[1] != width:
                out = out.permute(0, 3, 1, 2)
            if out.shape[-1] * out.shape[-2] > 1:
                return name, out, features
    return None, None, features


def grad_cam(loaded: LoadedModel, paths: Sequence[Path], classes: Sequence[int]) -> Optional[list[CamResult]]:
    """Heat maps of where the model looked for class `classes[i]` in image `paths[i]`.

    Returns None for backbones without a spatial feature map (e.g. vision transformers).
    """
    if len(paths) != len(classes):
        raise FinetuneError(f"internal mismatch: {len(paths)} images but {len(classes)} target classes")
    if not paths:
        return []
    model = loaded.model
    device = next(model.parameters()).device
    transform = ViewTransform(loaded.preprocessing)
    pre = loaded.preprocessing
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    was_training = model.training
    model.eval()
    results = []
    try:
        for path, target in zip(paths, classes):
            tensor = transform(load_rgb(path))[0].unsqueeze(0).to(device)
            # Gradients must reach the feature map even when every backbone parameter is frozen.
            tensor.requires_grad_(True)
            with torch.enable_grad():
                name, activation, features = _last_spatial_output(model.backbone, tensor)
                if activation is None:
                    return None
                score = model.head(features)[0, int(target)]
                (grads,) = torch.autograd.grad(score, activation)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=tensor.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            cam = cam / cam.max() if float(cam.max()) > 0 else cam
            shown = tensor[0].detach().cpu().permute(1, 2, 0).numpy() * std + mean
            image = np.clip(shown * 255.0, 0, 255).astype(np.uint8)
            results.append(CamResult(image, cam.cpu().numpy(), name))
    finally:
        model.train(was_training)
    return results
