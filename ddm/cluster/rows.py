"""An N x D matrix kept as blocks of rows on disk (the embed stage's per-shard emb-*.npy, memory-mapped).

k-means reads it in float32 a slice at a time, whatever the stored dtype
(float32 or float16), so a 10M x 1024 float16 set (20 GB) is never held, nor
converted, whole: the pages of the files come and go through the page cache.
"""

from __future__ import annotations

import numpy as np


class Rows:
    """Row blocks read as one matrix: ``len(rows)``, ``rows.shape``, ``rows[a:b]`` (a float32 copy), ``take``."""

    def __init__(self, blocks: list[np.ndarray]):
        if not blocks or any(b.ndim != 2 or b.shape[1] != blocks[0].shape[1] for b in blocks):
            raise ValueError(f"row blocks must be 2-d with one width, not shapes {[b.shape for b in blocks]}")
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b) for b in blocks])  # block j holds rows starts[j]:starts[j + 1]
        self.shape = (int(self.starts[-1]), int(blocks[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("Rows are read by contiguous slices (rows[a:b]); use take() for chosen rows")
        start, stop, _ = index.indices(len(self))
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=np.float32)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for j in range(max(first, 0), len(self.blocks)):
            lo, hi = max(start, self.starts[j]), min(stop, self.starts[j + 1])
            if lo >= stop:
                break
            if hi > lo:
                out[lo - start : hi - start] = self.blocks[j][lo - self.starts[j] : hi - self.starts[j]]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 copy of the given rows (ascending indices), each block read only where they fall."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        bounds = np.searchsorted(rows, self.starts)  # rows[bounds[j]:bounds[j + 1]] fall in block j
        for j, block in enumerate(self.blocks):
            lo, hi = bounds[j], bounds[j + 1]
            if hi > lo:
                out[lo:hi] = block[rows[lo:hi] - self.starts[j]]
        return out

    def sample(self, size: int | None, seed: int) -> np.ndarray:
        """float32 copy of ``size`` rows drawn without replacement with ``seed``, in row order; every row when
        ``size`` is None or at least N (then exactly the matrix, as if it had been read whole)."""
        n = len(self)
        if size is None or size >= n:
            return self[0:n]
        # a stream of its own, apart from the one k-means++ seeding draws from the same seed
        rng = np.random.default_rng([int(seed), SAMPLE_STREAM])
        return self.take(np.sort(rng.choice(n, size=int(size), replace=False)))


SAMPLE_STREAM = 0x5A3D1E
