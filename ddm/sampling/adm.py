"""Samples in the interchange layout of ADM's evaluation suite (Dhariwal & Nichol 2021).

ADM's evaluator and most papers' FID scripts read one ``.npz`` whose ``arr_0`` is
uint8 ``[N, H, W, 3]`` RGB images; ADM's class-conditional sampler also stores the
class labels as ``arr_1`` (int). The evaluator reads ``arr_0`` only, so ``arr_1`` is
written only when the images have class labels: an unconditional set has none.
Grayscale images are repeated to three channels, which is what the evaluator's
Inception sees for a grayscale JPEG too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddm.errors import BadInput, MissingInput
from ddm.io import atomic_path

IMAGES, LABELS = "arr_0", "arr_1"


def to_rgb(images: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 ``[N, H, W]``, ``[N, H, W, 1]`` or ``[N, H, W, 3]`` -> uint8 ``[N, H, W, 3]``."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise BadInput(f"{name}: the ADM layout holds uint8 pixels, got {x.dtype}; quantise to 0..255 first")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise BadInput(f"{name}: expected images [N, H, W], [N, H, W, 1] or [N, H, W, 3], got shape {x.shape}")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def write_adm_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``images`` (and, when given, int ``labels``, one per image) to ``path`` as ``arr_0`` / ``arr_1``.

    Labels below 0 mean "no class": a set with any of them is written without ``arr_1``.
    """
    rgb = to_rgb(images, str(path))
    arrays = {IMAGES: rgb}
    if labels is not None:
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(y) != len(rgb):
            raise BadInput(f"{path}: {len(y)} labels for {len(rgb)} images; pass one label per image")
        if len(y) and (y >= 0).all():
            arrays[LABELS] = y
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def read_adm_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images uint8 ``[N, H, W, 3]`` and labels (None when the file has none) of an ADM-layout ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: write it with `ddm sample` (samples/samples_adm.npz)")
    with np.load(path) as f:
        if IMAGES not in f.files:
            raise BadInput(f"{path} is not in the ADM layout: no `arr_0` (it holds {sorted(f.files)})")
        images = f[IMAGES]
        labels = f[LABELS] if LABELS in f.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise BadInput(
            f"{path}: `arr_0` must be uint8 [N, H, W, 3] in the ADM layout, got {images.dtype} {images.shape}"
        )
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        raise BadInput(f"{path}: `arr_1` must hold one int label per image, got {labels.dtype} {labels.shape}")
    return images, labels
