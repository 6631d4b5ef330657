"""Gradual unfreezing by backbone stage.

`train.unfreeze: {3: [layer3]}` makes layer3 trainable from epoch 3 on; `train.fine_tune: N`
trains only the head for N epochs, then what `model.trainable` (default: everything) says, at the
stage rates of engine/optim.py's `stage_lr_multipliers` (one rate unless layer_decay/lr_mult).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.freezing import HEAD, apply_freeze, require_stages, select_parameters, trainable_stages
from finetune.config.recipe import TrainConfig

__all__ = ["UnfreezePlan", "describe_beyond", "plan_unfreezing"]


@dataclass
class UnfreezePlan:
    """Which parameters train from which epoch on; epoch 1 is the starting point."""

    steps: dict[int, set[str]]  # epoch → names of the parameters trainable from that epoch on
    beyond: list[int] = field(default_factory=list)  # scheduled epochs after the run's last: never reached

    @property
    def ever_trainable(self) -> set[str]:
        """Every parameter that trains at some epoch: all of them belong in the optimizer from the start."""
        return set().union(*self.steps.values())

    def trainable_at(self, epoch: int) -> set[str]:
        """Parameter names that train in `epoch` (1-based)."""
        return self.steps[max(e for e in self.steps if e <= max(epoch, 1))]

    def apply(self, model: nn.Module, epoch: int) -> list[str]:
        """Freeze/unfreeze `model` for `epoch`; returns its trainable stages if that changed, else []."""
        wanted = self.trainable_at(epoch)
        current = {n for n, p in model.named_parameters() if p.requires_grad}
        if wanted == current:
            return []
        # apply_freeze also recomputes which BatchNorm layers stay in eval mode.
        apply_freeze(model, wanted, getattr(model, "bn_policy", "frozen"))
        return trainable_stages(model)


def plan_unfreezing(model: nn.Module, cfg: TrainConfig) -> UnfreezePlan:
    """The plan from `train.unfreeze` / `train.fine_tune`, starting from the model's current freezing.

    Steps scheduled after `train.epochs` are left out (their stages stay frozen) and listed in `beyond`.
    """
    plan = _full_plan(model, cfg)
    beyond = sorted(e for e in plan.steps if e > cfg.epochs)
    return UnfreezePlan({e: names for e, names in plan.steps.items() if e <= cfg.epochs}, beyond)


def describe_beyond(plan: UnfreezePlan, cfg: TrainConfig) -> str:
    """The note that a schedule reaches past the last epoch ("" when it does not)."""
    if not plan.beyond:
        return ""
    if cfg.fine_tune:
        return (f"note: train.fine_tune={cfg.fine_tune} head-only epoch(s) fill all train.epochs={cfg.epochs}: the "
                "backbone stays frozen in this run (give more epochs to fine-tune it)")
    return (f"note: train.unfreeze at epoch(s) {', '.join(map(str, plan.beyond))} comes after the last epoch "
            f"({cfg.epochs}): those stages stay frozen in this run")


def _full_plan(model: nn.Module, cfg: TrainConfig) -> UnfreezePlan:
    current = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.fine_tune:
        require_stages(model, "train.fine_tune")
        head_only = select_parameters(model, [HEAD])
        if current == head_only:
            raise FinetuneError(
                "train.fine_tune unfreezes the backbone after the head-only epochs, but model.trainable "
                "leaves it frozen; remove model.trainable/trainable_last/freeze_to or train.fine_tune"
            )
        return UnfreezePlan({1: head_only, cfg.fine_tune + 1: current})
    steps = {1: current}
    if cfg.unfreeze:
        require_stages(model, "train.unfreeze")
        for epoch in sorted(cfg.unfreeze):
            current = current | select_parameters(model, cfg.unfreeze[epoch], f"train.unfreeze[{epoch}]")
            steps[epoch] = current
    return UnfreezePlan(steps)
