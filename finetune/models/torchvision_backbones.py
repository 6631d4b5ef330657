"""torchvision models as backbones, with hand-mapped stages (the project's classics: classics.py).

Each family is cut where its classifier begins (fastai-style): the convolutional body keeps the
original module names (so `layer4` and torchvision state-dict keys work), then the global pool
that `model.head.pool` names, and the project's MLP head takes the classifier's place:

- ResNet/ResNeXt/Wide-ResNet: `fc` is replaced.
- AlexNet/VGG: the whole `classifier` Sequential (fc6, fc7 and the 1000-way layer) is replaced,
  so the head sees the pooled 256/512 conv features instead of 4096-wide fc7 activations.
- SqueezeNet: the classifier (Dropout → 1x1 conv → ReLU → average pool) is replaced.
- GoogLeNet/Inception-v3: `fc` is replaced; the auxiliary heads (`aux1/aux2`, `AuxLogits`) are
  dropped, as they only serve the original from-scratch training loss and are unused at inference.
- EfficientNet/MobileNet: `classifier` is replaced.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torchvision
from timm.layers import SelectAdaptivePool2d
from torch import nn

from finetune.data.preprocessing import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.weights import load_matching, read_state_dict, resolve_weights_path
from finetune.config.recipe import ModelConfig

__all__ = ["PooledBody", "create", "names"]


class PooledBody(nn.Module):
    """Runs named layers in order, then global pooling and flattening."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", pool: Optional[str]) -> None:
        super().__init__()
        self.order = list(layers)
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool, flatten=True) if pool else nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return self.global_pool(x)


def _split_at_pools(prefix: str, sequential: nn.Sequential) -> dict[str, list[str]]:
    """A stage per run of layers ending in a max-pool: features.0-4 → block1, ..."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for index, layer in enumerate(sequential):
        current.append(f"{prefix}.{index}")
        if isinstance(layer, nn.MaxPool2d):
            stages[f"block{len(stages) + 1}"] = current
            current = []
    if current:
        stages[f"block{len(stages) + 1}"] = current
    return stages


def _resnet(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    layers = OrderedDict((n, getattr(model, n)) for n in names)
    stages = {"stem": ["conv1", "bn1"], **{f"layer{i}": [f"layer{i}"] for i in range(1, 5)}}
    return layers, stages


def _features_only(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    """VGG, AlexNet, SqueezeNet: the `features` Sequential, stages split at max-pools."""
    return OrderedDict(features=model.features), _split_at_pools("features", model.features)


def _indexed_features(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    """EfficientNet, MobileNet: `features[0]` is the stem, each later index a stage."""
    stages = {"stem" if i == 0 else f"stage{i}": [f"features.{i}"] for i in range(len(model.features))}
    return OrderedDict(features=model.features), stages


def _densenet(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    stages = {"stem": ["features.conv0", "features.norm0"]}
    for i in range(1, 5):
        stages[f"denseblock{i}"] = [f"features.denseblock{i}"] + (
            [f"features.transition{i}"] if i < 4 else ["features.norm5"]
        )
    return OrderedDict(features=model.features, relu=nn.ReLU(inplace=False)), stages


def _googlenet(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"]
    names += ["inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4"]
    names += ["inception5a", "inception5b"]
    stages = {
        "stem": ["conv1", "conv2", "conv3"],
        "inception3": ["inception3a", "inception3b"],
        "inception4": [f"inception4{c}" for c in "abcde"],
        "inception5": ["inception5a", "inception5b"],
    }
    return OrderedDict((n, getattr(model, n)) for n in names), stages


def _inception_v3(model: nn.Module) -> tuple[OrderedDict, dict[str, list[str]]]:
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    names += ["maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"]
    names += ["Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    stages = {
        "stem": [n for n in names if n.startswith("Conv2d")],
        "mixed5": ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
        "mixed6": [f"Mixed_6{c}" for c in "abcde"],
        "mixed7": [f"Mixed_7{c}" for c in "abc"],
    }
    return OrderedDict((n, getattr(model, n)) for n in names), stages


FAMILIES: dict[str, Callable[[nn.Module], tuple[OrderedDict, dict[str, list[str]]]]] = {
    "resnet": _resnet,
    "resnext": _resnet,
    "wide_resnet": _resnet,
    "vgg": _features_only,
    "alexnet": _features_only,
    "squeezenet": _features_only,
    "densenet": _densenet,
    "googlenet": _googlenet,
    "inception_v3": _inception_v3,
    "efficientnet": _indexed_features,
    "mobilenet": _indexed_features,
}


def _family(name: str) -> Optional[str]:
    return next((f for f in FAMILIES if name.startswith(f)), None)


def names() -> list[str]:
    """torchvision classification models this module can cut into a body."""
    return [n for n in torchvision.models.list_models(module=torchvision.models) if _family(n)]


def _preprocessing_from_weights(weights, image_size: Optional[int], default_size: int) -> Preprocessing:
    if weights is None:
        return Preprocessing(size=image_size or default_size)
    transforms = weights.transforms()
    crop = int(transforms.crop_size[0])
    resize = int(transforms.resize_size[0])
    return Preprocessing(
        size=image_size or crop,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=str(transforms.interpolation.value),
        crop_pct=crop / resize,
    )


def create(cfg: ModelConfig, image_size: Optional[int]):
    """(body, stages, preprocessing) for a torchvision model (`tv/<name>`)."""
    name = cfg.backbone.split("/", 1)[-1]
    family = _family(name)
    if family is None or name not in torchvision.models.list_models(module=torchvision.models):
        raise FinetuneError(f"unknown torchvision backbone '{name}'; supported: {', '.join(names())}")
    weights = None
    if cfg.pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    kwargs = {"aux_logits": False, "init_weights": False} if family in ("googlenet", "inception_v3") else {}
    if weights is not None and family in ("googlenet", "inception_v3"):
        kwargs = {}
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as err:  # urllib's URLError is an OSError
        raise FinetuneError(
            f"cannot download pretrained weights for '{name}' ({err}); offline? "
            "Use model.weights: PATH to a local torchvision state dict instead"
        ) from None
    if cfg.weights:
        path, _ = resolve_weights_path(cfg.weights)
        skip = ("fc.", "classifier.", "AuxLogits.", "aux1.", "aux2.")
        load_matching(model, read_state_dict(path), skip_prefixes=skip)
    transform_input = bool(getattr(model, "transform_input", False))
    layers, stages = FAMILIES[family](model)
    default_size = 299 if family == "inception_v3" else 224
    preprocessing = _preprocessing_from_weights(weights, image_size, default_size)
    if transform_input:
        # GoogLeNet/Inception weights expect inputs normalised with mean=std=0.5; torchvision
        # converts inside forward(), which the cut body skips, so normalise that way directly.
        preprocessing = dataclasses.replace(preprocessing, mean=(0.5,) * 3, std=(0.5,) * 3)
    return PooledBody(layers, cfg.head.pool), stages, preprocessing
