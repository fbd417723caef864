"""Precision and recall of generated samples by k-NN manifolds (Kynkäänniemi et al. 2019).

Each set's manifold is the union of balls around its points, the radius of a
point being the distance to its k-th nearest neighbour within the same set
(itself excluded). Then::

    precision = fraction of generated points inside the real manifold   (fidelity)
    recall    = fraction of real points inside the generated manifold   (coverage of the data)

A point on a ball's boundary counts as inside (``<=``), so identical sets give
exactly 1 for both. Distances are Euclidean, computed in blocks so that memory
stays at ``block x N`` whatever the set sizes.
"""

from __future__ import annotations

import numpy as np
import torch

from ddm.errors import BadInput

BLOCK = 2048


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.ndim != 2:
        raise BadInput(f"features must be [N, D], got shape {tuple(t.shape)}")
    return t


def knn_radii(x, k: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row of x."""
    x = _as_tensor(x)
    if not 1 <= k < len(x):
        raise BadInput(f"k={k} nearest neighbours need more than k points; the set has {len(x)}")
    radii = []
    for lo in range(0, len(x), BLOCK):
        d = torch.cdist(x[lo : lo + BLOCK], x)
        # The k+1-th smallest distance skips the point itself (distance 0).
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_fraction(points, centres, radii: torch.Tensor) -> float:
    """Fraction of ``points`` within ``radii[j]`` of at least one ``centres[j]``."""
    points, centres = _as_tensor(points), _as_tensor(centres)
    inside = 0
    for lo in range(0, len(points), BLOCK):
        d = torch.cdist(points[lo : lo + BLOCK], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 5) -> dict:
    """``{"precision", "recall", "k"}`` of generated features ``fake`` against real features ``real``."""
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    return dict(
        precision=inside_fraction(fake, real, real_radii), recall=inside_fraction(real, fake, fake_radii), k=int(k)
    )
