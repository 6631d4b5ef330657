"""One labelled (or unlabeled) image: what every data source yields and every loader reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

__all__ = ["Sample"]


@dataclass(frozen=True)
class Sample:
    """One image and its target, as the task encodes it: a class index (one label per image), a tuple of the
    class indices present (several per image; empty: none), or None when unlabeled."""

    path: Path
    target: Union[int, tuple[int, ...], None] = None
