"""Models: backbones by name, local weights, the MLP head, stage-wise freezing and unfreezing."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from finetune.data.preprocessing import Preprocessing
from finetune.models.backbones import Backbone, create_backbone
from finetune.models.classifier import Classifier
from finetune.models.freezing import apply_freeze, format_summary, resolve_trainable, stage_summary
from finetune.models.heads import create_head
from finetune.models.unfreezing import UnfreezePlan, plan_unfreezing
from finetune.config.recipe import ModelConfig

__all__ = [
    "build_model",
    "Classifier",
    "Backbone",
    "format_summary",
    "stage_summary",
    "apply_freeze",
    "resolve_trainable",
    "UnfreezePlan",
    "plan_unfreezing",
]


def build_model(
    cfg: ModelConfig, num_classes: int, image_size: Optional[int] = None, crop_pct: Optional[float] = None
) -> tuple[Classifier, Preprocessing]:
    """Backbone + MLP head for `num_classes`, frozen as `cfg.trainable` / `trainable_last` / `freeze_to` say.

    The preprocessing is the backbone's pretrained one at `image_size`, with `crop_pct` (data.crop_pct) if given.
    """
    backbone = create_backbone(cfg, image_size)
    head = create_head(backbone.num_features, num_classes, cfg.head.hidden, cfg.head.dropout, cfg.head.batchnorm)
    model = Classifier(backbone.body, head, backbone.stages)
    apply_freeze(model, resolve_trainable(model, cfg.trainable, cfg.trainable_last, cfg.freeze_to), cfg.bn)
    preprocessing = backbone.preprocessing
    return model, preprocessing if crop_pct is None else replace(preprocessing, crop_pct=crop_pct)
