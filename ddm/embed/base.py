"""What every clustering encoder is, and the helpers they share."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Encoder(Protocol):
    """``encoder(images)`` -> L2-normalised float32 rows [B, dim] of uint8 images [B, H, W(, 3)].

    An encoder may also split itself in two, so that the embed stage's loader workers do the CPU half:
    ``prepare`` (an attribute: a picklable callable holding no weights, uint8 images -> a CPU tensor,
    e.g. resized and normalised) and ``encode(prepared) -> rows`` (the network, on the device), with
    ``encoder(images) == encoder.encode(encoder.prepare(images))``. One without them gets uint8 batches.
    """

    name: str
    dim: int
    spec: dict

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def split(encoder) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[torch.Tensor], np.ndarray]]:
    """(prepare, encode) of ``encoder``: what a loader worker does to a uint8 batch, and what the device does next."""
    prepare = getattr(encoder, "prepare", None)
    if prepare is not None:
        return prepare, encoder.encode
    return as_tensor, lambda batch: encoder(batch.numpy())


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """The uint8 batch as it is (a tensor: loader workers hand tensors over in shared memory)."""
    return torch.from_numpy(np.ascontiguousarray(images))


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()
