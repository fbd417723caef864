"""The Fréchet distance between two sets of features, each summarised as a Gaussian.

For N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; Heusel et al. 2017 call it FID
when the features come from Inception)::

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

``S1 S2`` is not symmetric, and ``scipy.linalg.sqrtm`` of it can return complex
values or fail when a covariance is singular (fewer samples than dimensions).
Here ``tr((S1 S2)^(1/2))`` is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``:
``S1 S2 = A (A S2 A) A^-1`` is similar to the symmetric PSD matrix ``A S2 A``, so
both have the same eigenvalues, and the trace of the root is the sum of the
square roots of those eigenvalues. Everything is symmetric ``eigh`` in float64;
eigenvalues that round below zero are clipped, which keeps the result real and
exact for singular covariances too.

With fewer samples than dimensions (a few hundred samples in Inception's 2048
dimensions, a class's samples) ``frechet_distance_features`` works on the
centred features instead: with ``S1 = A^T A / (n1 - 1)`` and ``S2 = B^T B / (n2 - 1)``
the non-zero eigenvalues of ``S1 S2`` are the squared singular values of
``A B^T / sqrt((n1 - 1)(n2 - 1))``, an ``n1 x n2`` matrix, so the trace term is
the sum of those singular values. Same value, no ``D x D`` matrix.
"""

from __future__ import annotations

import numpy as np

from ddm.errors import BadInput


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of ``features`` [N, D], in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise BadInput(f"features must be [N, D] with N >= 2 to estimate a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric PSD S1, S2, via the symmetric matrix ``S1^(1/2) S2 S1^(1/2)``."""
    a = _psd_sqrt(np.asarray(s1, dtype=np.float64))
    m = a @ np.asarray(s2, dtype=np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); never negative."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise BadInput(f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    # Identical inputs give ~1e-13 of either sign from rounding; the distance itself is >= 0.
    return float(max(fd, 0.0))


def frechet_distance_features(a, b) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [Na, D] and [Nb, D]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[1] and min(len(a), len(b)) >= 2:
        if min(len(a), len(b)) < a.shape[1]:
            return _fd_from_samples(a, b)
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _fd_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance through the ``Na x Nb`` cross product of the centred features (see above)."""
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(axis=0) - b.mean(axis=0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    fd = diff @ diff + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * cross
    return float(max(fd, 0.0))
