"""The classifier head that replaces a backbone's own: a BatchNorm/Dropout MLP."""

from __future__ import annotations

from torch import nn

__all__ = ["create_head"]


def create_head(
    in_features: int, num_classes: int, hidden: list[int], dropout: float, batchnorm: bool
) -> nn.Sequential:
    """MLP head: for each hidden width Linear → BN → ReLU → Dropout, then Linear to the classes.

    Args:
        in_features: length of the backbone's pooled feature vector.
        num_classes: number of output logits.
        hidden: widths of the hidden layers, e.g. [1024, 512]; [] gives Dropout → Linear.
        dropout: dropout probability after each hidden layer (before the only Linear if no hidden).
        batchnorm: add BatchNorm1d after each hidden Linear.
    """
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if not hidden and dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
