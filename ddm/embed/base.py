"""What every clustering encoder is, and the helpers they share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Encoder(Protocol):
    name: str
    dim: int
    spec: dict

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W] or [B,H,W,C] -> float [B,C,H,W] in 0..1."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()
