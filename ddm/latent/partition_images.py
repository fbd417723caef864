"""A partition's images in fixed-size batches, in stored order, decoded by loader workers or in this process.

Decoding the stored images (PNG or JPEG) costs more CPU than a GPU takes to
encode them, so ``ddm encode`` can hand it to ``vae.workers`` processes.
Each worker decodes whole shards, and the loader hands them back in shard order
(a map-style dataset keeps its order whatever the worker count); the batches
are cut here, in this process, from that one ordered stream. So the batches,
and the latents encoded from them, are the same with any number of workers,
and the same as before workers existed: a batch may span two shards.

What one worker hands over is one shard's images as a single uint8 array (a
partition shard holds about ``cluster.partition_shard_size`` images), so the
memory in flight is about (workers + 1) shards' decoded images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddm.cores import available_cores
from ddm.data.shards import iter_samples
from ddm.errors import UserError


@dataclass(frozen=True)
class ImageBatch:
    """Consecutive samples of a partition: images uint8 [N, H, W] or [N, H, W, C] and what goes beside them."""

    keys: list[str]
    labels: list[int]
    captions: list[str | None]
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, part: slice) -> ImageBatch:
        return ImageBatch(self.keys[part], self.labels[part], self.captions[part], self.images[part])

    @staticmethod
    def joined(parts: list[ImageBatch]) -> ImageBatch:
        if len(parts) == 1:
            return parts[0]
        return ImageBatch(
            [k for p in parts for k in p.keys],
            [y for p in parts for y in p.labels],
            [c for p in parts for c in p.captions],
            np.concatenate([p.images for p in parts]),
        )


@dataclass(frozen=True)
class _Failed:
    """A worker's error, handed back as data: the loader would re-raise it wrapped in a multi-line traceback."""

    error: UserError


class _ShardImages(torch.utils.data.Dataset):
    """Item ``i``: shard ``i`` of the list, decoded (module-level, so a spawned worker receives it pickled)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageBatch | _Failed | None:
        try:
            samples = list(iter_samples([self.paths[i]]))
        except UserError as e:  # a damaged shard: its one-line message, as a run without workers gives it
            return _Failed(e)
        if not samples:
            return None
        return ImageBatch(
            [s["key"] for s in samples],
            [int(s["label"]) for s in samples],
            [s.get("caption") for s in samples],
            np.stack([s["image"] for s in samples]),
        )


def _as_is(item):
    return item


def _shards(paths: list[str], workers: int) -> Iterator[ImageBatch]:
    dataset = _ShardImages(paths)
    # more workers than cores only compete with the encoding process; more than shards would idle
    workers = min(int(workers), len(dataset), available_cores())
    if workers <= 0:
        items = (dataset[i] for i in range(len(dataset)))
    else:
        # prefetch_factor=1: a worker decodes its next shard while the last one waits, no further ahead
        items = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=1
        )
    for item in items:
        if isinstance(item, _Failed):
            raise item.error
        if item is not None:
            yield item


def image_batches(paths: list[str], batch_size: int, workers: int = 0) -> Iterator[ImageBatch]:
    """The samples of the shards ``paths``, in order, in batches of ``batch_size`` (the last one may be smaller)."""
    pending: list[ImageBatch] = []
    held = 0
    for shard in _shards(paths, workers):
        pending.append(shard)
        held += len(shard)
        if held < batch_size:
            continue
        joined = ImageBatch.joined(pending)
        full = len(joined) - len(joined) % batch_size
        for start in range(0, full, batch_size):
            yield joined[start : start + batch_size]
        pending = [joined[full:]] if full < len(joined) else []
        held = len(joined) - full
    if held:
        yield ImageBatch.joined(pending)
