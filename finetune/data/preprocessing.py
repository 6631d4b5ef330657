"""How images are sized and normalised for a model: shared by models (which define it) and data (which applies it).

Kept free of albumentations and OpenCV so that building a model does not import them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["INTERPOLATIONS", "Preprocessing"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How images are sized and normalised for a model; stored in every checkpoint."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # one of INTERPOLATIONS; anything else is read as bilinear
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        """Plain types, for checkpoints (weights_only loading)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        """The inverse of `to_dict`."""
        return cls(
            size=int(raw["size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            interpolation=str(raw["interpolation"]),
            crop_pct=float(raw["crop_pct"]),
        )
