"""Held-out (or training) images of a shard set as arrays, for the metrics.

Which images are held out, and how ``evaluation/heldout/`` is written, is the
evaluate stage's business (``ddm.eval.run.heldout``); this reads any
shard set folder.
"""

from __future__ import annotations

import numpy as np

from ddm.data.shards import iter_samples, shard_paths
from ddm.errors import BadInput


def load_images(folder, limit: int | None = None, exclude: set | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """(uint8 images, int64 labels, keys) of a shard set, in stored order, skipping ``exclude`` keys.

    ``limit`` stops after that many images. Labels are -1 for unlabelled images.
    """
    images, labels, keys = [], [], []
    for s in iter_samples(shard_paths(folder)):
        if exclude and s["key"] in exclude:
            continue
        images.append(s["image"])
        labels.append(s["label"])
        keys.append(s["key"])
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise BadInput(
            f"no images in {folder}: the shard set is empty or every image in it is excluded; "
            f"write it again (redo=true)"
        )
    return np.stack(images), np.asarray(labels, dtype=np.int64), keys


def load_captions(folder, keys: list[str]) -> list[str | None]:
    """The caption of each of ``keys`` in a shard set (None where a sample has none), in the order given."""
    found = {s["key"]: s.get("caption") for s in iter_samples(shard_paths(folder), decode=False)}
    return [found.get(k) for k in keys]
