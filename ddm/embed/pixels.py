"""The ``pixels`` encoder: downsampled pixels, no weights needed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddm.errors import BadInput
from ddm.images import batch_to_unit_range


class PixelEncoder:
    """Pixels at ``size`` x ``size``, centred per image, L2-normalised; optional random projection to ``dim``."""

    name = "pixels"

    def __init__(self, channels: int, size: int = 16, dim: int | None = None, seed: int = 0):
        self.size = int(size)
        self.channels = int(channels)
        flat = self.channels * self.size * self.size
        self.dim = int(dim) if dim else flat
        self.spec = dict(encoder=self.name, size=self.size, channels=self.channels, dim=dim, seed=seed)
        # A fixed Gaussian projection (Johnson-Lindenstrauss) keeps cosine similarities
        # approximately while shrinking big images; numpy's seeded generator makes it
        # the same on every machine, so resumed runs produce matching rows.
        self.projection = None
        if dim:
            rng = np.random.default_rng(seed)
            self.projection = torch.from_numpy(rng.standard_normal((flat, self.dim), dtype=np.float32))

        self.prepare = Downsample(self.size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.encode(self.prepare(images))

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """Rows of images that ``prepare`` downsampled."""
        if x.shape[1] != self.channels:
            raise BadInput(
                f"pixels encoder was built for {self.channels} channels but got images with {x.shape[1]}: "
                f"embed the run's own data (data/manifest.json says how many channels it has)"
            )
        x = x.flatten(1)
        # Centring removes overall brightness, so the direction encodes the pattern.
        x = x - x.mean(dim=1, keepdim=True)
        x = F.normalize(x, dim=1)
        if self.projection is not None:
            x = F.normalize(x @ self.projection, dim=1)
        return x.numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class Downsample:
    """uint8 images -> float32 [B, C, size, size] in [0, 1]: the CPU half of the encoder (loader workers run it)."""

    size: int

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = batch_to_unit_range(images)
        # antialias: downsampling without it aliases fine texture into the embedding.
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
