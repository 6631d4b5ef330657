"""Exponential moving average of model weights (timm's ModelEmaV3) that survives a resume."""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn

__all__ = ["WeightEma"]


class WeightEma:
    """EMA weights in `module`, updated after every optimiser step.

    The decay warms up from 0 towards `decay` over the first steps (timm's warmup), so short
    fine-tuning runs are not dominated by the starting weights; the update count is checkpointed
    so a resumed run continues the same warmup.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        # A deep copy keeps train.compile's compiled forward, which is bound to the live model: run the copy eager.
        self._ema.module._compiled_call_impl = None
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (always in eval mode)."""
        return self._ema.module

    def update(self, model: nn.Module) -> None:
        """Blend the live weights into the average."""
        self.updates += 1
        self._ema.update(model, step=self.updates)

    def state_dict(self) -> dict:
        """Averaged weights and the update count."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
