"""Reading data shards for the embed stage: decoding in loader worker processes, encoding on the device.

The shards to embed are dealt round-robin to ``embed.workers`` torch DataLoader
workers. Each worker reads its shards one at a time, decodes the images and
runs the encoder's CPU half (``prepare``: resizing, normalising) on batches of
``embed.batch_size`` consecutive samples of one shard; the main process runs
the network on each batch as it arrives and hands back a shard once its last
batch is in. Shards may finish in any order, but every shard is cut into the
same batches whatever the number of workers (0: all in the main process), so
its rows are the same bytes.

Memory holds at most ``2 x workers`` prepared batches in flight and the rows of
the shards being read (one per worker), never a whole shard's images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddm.cores import available_cores
from ddm.data.shards import iter_samples
from ddm.embed.base import split
from ddm.errors import BadInput, UserError

# ``embed.workers=null`` uses every core the job may run on but one (the main process encodes), up to this.
MAX_AUTO_WORKERS = 16


class Batch(NamedTuple):
    shard: int  # position in the list of shards being read
    keys: list[str]
    images: torch.Tensor | None  # what ``prepare`` made of the samples; None: no samples (an empty shard's end)
    last: bool  # the shard's final batch


class Failed(NamedTuple):
    """A user-facing error met in a worker, handed to the main process to raise as the one line it is."""

    error: UserError


class ShardBatches(IterableDataset):
    """Batches of ``batch_size`` consecutive samples of each shard in ``paths``, worker i reading shards i, i+W, ..."""

    def __init__(self, paths: list[str], batch_size: int, prepare: Callable[[np.ndarray], torch.Tensor]):
        self.paths, self.batch_size, self.prepare = list(paths), int(batch_size), prepare

    def __iter__(self) -> Iterator[Batch | Failed]:
        info = get_worker_info()
        mine = range(len(self.paths)) if info is None else range(info.id, len(self.paths), info.num_workers)
        try:
            for shard in mine:
                yield from self._batches(shard)
        except UserError as e:  # a damaged shard: the DataLoader would wrap it in a traceback
            yield Failed(e)

    def _batches(self, shard: int) -> Iterator[Batch]:
        keys: list[str] = []
        images: list[np.ndarray] = []
        for sample in iter_samples([self.paths[shard]]):
            keys.append(sample["key"])
            images.append(sample["image"])
            if len(images) == self.batch_size:
                yield Batch(shard, keys, self.prepare(np.stack(images)), last=False)
                keys, images = [], []
        yield Batch(shard, keys, self.prepare(np.stack(images)) if images else None, last=True)


def _as_is(item):
    return item


def embed_shards(
    encoder, paths: list[str], batch_size: int, workers: int
) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """``(position in paths, keys, float32 rows)`` of each shard, in the order they finish, rows in stored order."""
    prepare, encode = split(encoder)
    loader = DataLoader(
        ShardBatches(paths, batch_size, prepare),
        batch_size=None,  # the dataset makes the batches: one shard's samples each
        num_workers=workers,
        collate_fn=_as_is,
    )
    pending: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    for batch in loader:
        if isinstance(batch, Failed):
            raise batch.error
        keys, rows = pending.setdefault(batch.shard, ([], []))
        if batch.keys:
            keys.extend(batch.keys)
            with torch.no_grad():
                rows.append(np.asarray(encode(batch.images), dtype=np.float32))
        if batch.last:
            del pending[batch.shard]
            yield batch.shard, keys, np.concatenate(rows) if rows else np.zeros((0, encoder.dim), np.float32)


def loader_workers(setting: int | None, shards: int) -> int:
    """Loader worker processes for ``embed.workers`` (None: from the cores this job may use), at most one per shard."""
    if setting is None:
        setting = min(MAX_AUTO_WORKERS, available_cores() - 1)
    elif setting < 0:
        raise BadInput(
            f"embed.workers={setting}: give the number of loader processes that decode images "
            f"(0: decode in the main process; null: one per core but one)"
        )
    return max(0, min(int(setting), shards))
