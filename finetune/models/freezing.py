"""Freezing by stage: which parameters train, BatchNorm policy, and a per-stage summary."""

from __future__ import annotations

from typing import Optional

from torch import nn

from finetune.errors import FinetuneError

__all__ = ["Classifier", "resolve_trainable", "apply_freeze", "stage_summary", "format_summary"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class Classifier(nn.Module):
    """Backbone body (image → features) followed by the MLP head.

    BatchNorm layers listed in `frozen_bn` stay in eval mode even in `train()`, so the running
    statistics of frozen stages do not drift.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, stages: dict[str, list[str]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stages = stages
        self.frozen_bn: list[str] = []

    def forward(self, x, pre_logits: bool = False):
        features = self.backbone(x)
        return features if pre_logits else self.head(features)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode:
            for name in self.frozen_bn:
                self.get_submodule(name).eval()
        return self


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_trainable(model: Classifier, names: Optional[list[str]]) -> set[str]:
    """Parameter names (of the whole model) that the recipe's `trainable` list selects.

    `names` holds stage names (see `finetune inspect`) or module paths inside the backbone; the
    head is always trainable. None means every parameter trains.
    """
    params = [n for n, _ in model.named_parameters()]
    if names is None:
        return set(params)
    modules = {n for n, _ in model.backbone.named_modules() if n}
    selected = {n for n in params if n.startswith("head.")}
    for name in names:
        if name in ("head",):
            continue
        if name in model.stages:
            prefixes = model.stages[name]
        elif name in modules:
            prefixes = [name]
        else:
            raise FinetuneError(
                f"unknown stage '{name}' in model.trainable; stages of this backbone: "
                f"{', '.join(model.stages)} (or any module path, e.g. {next(iter(model.stages.values()))[0]})"
            )
        selected |= {n for n in params if any(_matches(n, "backbone." + p) for p in prefixes)}
    return selected


def apply_freeze(model: Classifier, trainable: set[str], bn_policy: str = "frozen") -> None:
    """Set requires_grad from `trainable`; with bn_policy 'frozen', fully frozen BN layers stay in eval."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    model.frozen_bn = []
    if bn_policy != "frozen":
        return
    for name, module in model.named_modules():
        if isinstance(module, BN_TYPES):
            own = [p for p in module.parameters(recurse=False)]
            if own and not any(p.requires_grad for p in own):
                model.frozen_bn.append(name)
            elif not own and not any(_matches(t, name) for t in trainable):
                model.frozen_bn.append(name)  # affine=False BN: frozen when its stage is
    model.train(model.training)


def stage_summary(model: Classifier) -> list[tuple[str, int, int]]:
    """(stage, total parameters, trainable parameters) for every backbone stage and the head."""
    rows = []
    seen: set[str] = set()
    named = dict(model.named_parameters())
    for stage, prefixes in model.stages.items():
        names = [n for n in named if any(_matches(n, "backbone." + p) for p in prefixes) and n not in seen]
        seen |= set(names)
        rows.append((stage, sum(named[n].numel() for n in names), sum(named[n].numel() for n in names if named[n].requires_grad)))
    rest = [n for n in named if n not in seen and not n.startswith("head.")]
    if rest:
        rows.append(("other", sum(named[n].numel() for n in rest), sum(named[n].numel() for n in rest if named[n].requires_grad)))
    head = [n for n in named if n.startswith("head.")]
    rows.append(("head", sum(named[n].numel() for n in head), sum(named[n].numel() for n in head if named[n].requires_grad)))
    return rows


def format_summary(rows: list[tuple[str, int, int]]) -> str:
    """A small table of parameters per stage, with totals."""
    width = max(len(r[0]) for r in rows + [("total", 0, 0)])
    lines = [f"{'stage':<{width}}  {'params':>12}  {'trainable':>12}"]
    for stage, total, trainable in rows:
        lines.append(f"{stage:<{width}}  {total:>12,}  {trainable:>12,}")
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>12,}  {sum(r[2] for r in rows):>12,}")
    return "\n".join(lines)
