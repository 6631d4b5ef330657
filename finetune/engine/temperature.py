"""Temperature scaling (Guo et al. 2017): one scalar T that makes softmax(logits / T) calibrated."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["fit_temperature", "apply_temperature", "nll"]

# Outside this range the fit is saying something is wrong (a constant model, one class), not calibrating.
MIN_T, MAX_T = 0.05, 20.0


def nll(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64)) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(np.asarray(labels, dtype=np.int64))))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], steps: int = 100) -> float:
    """The temperature minimising validation NLL: LBFGS on log T (so T stays positive).

    1.0 when there is nothing to fit on: no images, or no validation mistake.
    Log-probabilities work as well as logits: softmax is unchanged by a per-row shift.
    """
    if len(labels) == 0:
        return 1.0
    if (np.asarray(logits).argmax(axis=1) == np.asarray(labels)).all():
        # With no mistake to learn from, NLL keeps falling as T -> 0: the fit would make every later
        # prediction (right or wrong) near-certain. Leave the model's own confidence alone.
        return 1.0
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(MIN_T, MAX_T))
    # LBFGS can stop on a worse point on a flat or odd surface; never make NLL worse than no scaling.
    return temperature if nll(logits, labels, temperature) <= nll(logits, labels, 1.0) else 1.0


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) from softmax(z): p^(1/T), renormalised (exact for one model and one view)."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0)) / temperature  # 0 stays ~0
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)
