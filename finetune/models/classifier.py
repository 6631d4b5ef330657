"""The fine-tuned network: a backbone body (image → features) followed by the MLP head."""

from __future__ import annotations

from torch import nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Backbone body (image → features) followed by the MLP head.

    BatchNorm layers listed in `frozen_bn` stay in eval mode even in `train()`, so the running
    statistics of frozen stages do not drift.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, stages: dict[str, list[str]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stages = stages  # stage name → parameter-name prefixes inside `backbone`, input to output
        self.frozen_bn: list[str] = []
        self.bn_policy = "frozen"
        self.features_in = False  # True: `x` is already the backbone's output (cached features, head-only epochs)

    def forward(self, x, pre_logits: bool = False):
        features = x if self.features_in else self.backbone(x)
        return features if pre_logits else self.head(features)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode:
            for name in self.frozen_bn:
                self.get_submodule(name).eval()
        return self
