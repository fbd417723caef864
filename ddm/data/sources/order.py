"""The order a source yields its samples in: a seeded permutation, drawn before anything is decoded.

Image folders are usually sorted by class (ImageNet: 1000 folders of about 1300
images each), and a training loader's shuffle buffer is small next to a class:
stored in that order, a batch would hold two or three classes. So a source
permutes the *index* of what it will read (the file list of a folder, the array
indices of a built-in set) and decodes one sample at a time in that order; the
permutation costs one integer per sample, never the images.

A source that can only be streamed (existing webdataset shards) permutes its
input shards instead; its ``Order`` says so, so a reader of the manifest knows
that samples inside one input shard kept their order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ddm.seeds import data_order_seed

PERMUTED_SAMPLES = "samples"
PERMUTED_SHARDS = "shards"


@dataclass(frozen=True)
class Order:
    """What was permuted and with which seed: ``data/manifest.json``'s ``order``."""

    permuted: str  # PERMUTED_SAMPLES (every sample) or PERMUTED_SHARDS (the input shards only)
    seed: int  # the run's seed; the permutation is drawn with ddm.seeds.data_order_seed(seed)

    def as_dict(self) -> dict:
        return asdict(self)


def permutation(count: int, seed: int) -> np.ndarray:
    """A permutation of ``range(count)`` that follows the run's ``seed`` (8 bytes per sample)."""
    return np.random.default_rng(data_order_seed(seed)).permutation(count)
