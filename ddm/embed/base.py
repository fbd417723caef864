"""What every clustering encoder is, and the helpers they share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Encoder(Protocol):
    name: str
    dim: int
    spec: dict

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()
