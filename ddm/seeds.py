"""Every random stream of a run, derived from its one ``seed``.

Streams that must not repeat one another get their own offset, named here, so
a new stream cannot collide with an existing one by accident and a reader can
see which seed each job uses. The numbers are fixed: changing one changes what
every existing run reproduces.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Expert k trains with seed + EXPERT_STRIDE * k: experts of one run never share a stream.
EXPERT_STRIDE = 1000
# The router's training stream: a prime far from every expert's.
ROUTER_OFFSET = 999_983
# The distilled student's training stream (``ddm distill``): far from every expert's and the router's.
DISTILL_OFFSET = 1_999_993
# Partition i of the router's mixed stream reads its shards with seed + PARTITION_STRIDE * i.
PARTITION_STRIDE = 7919
# Sampling: sample i's prior noise is drawn with stream_seed(seed, i), its ``sample`` strategy's draws with
# stream_seed(seed + ROUTING_OFFSET, i) (ddm.sampling.indexed), the sample stage's random labels with
# seed + SAMPLE_LABELS_OFFSET.
ROUTING_OFFSET = 1
# The evaluate stage: labels to sample (and its subset of samples/), its own prior noise.
EVAL_LABELS_OFFSET = 2
EVAL_NOISE_OFFSET = 3
# prepare stores the source's samples (or, for streamed shards, its input shards) in a permutation drawn with this.
DATA_ORDER_OFFSET = 4
# partition stores each cluster's samples in a permutation drawn with this, mixed with the cluster's index.
PARTITION_ORDER_OFFSET = 5
# The router draws each partition's held-out and training shards with this, mixed with the partition's index.
ROUTER_SHARDS_OFFSET = 6
SAMPLE_LABELS_OFFSET = 7


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(*parts: int) -> int:
    """One seed mixed from several integers (a job's seed, a rank, a step, a worker).

    Distinct tuples give unrelated streams (NumPy's SeedSequence hashing), so
    rank 1 of expert 0 never repeats rank 0 of expert 1 as ``seed + rank`` would.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: torch, NumPy (mod 2**32) and Python all accept it


def data_stream_seed(seed: int, start_step: int) -> int:
    """The seed of a job's data stream when it starts (or resumes) at ``start_step``.

    A fresh job reads with its own seed; a resumed one with a seed mixed with the
    step it resumes at, so it does not read again the samples it began with.
    """
    return int(seed) if int(start_step) == 0 else stream_seed(seed, start_step)


def expert_seed(seed: int, expert_id: int) -> int:
    return int(seed) + EXPERT_STRIDE * int(expert_id)


def router_seed(seed: int) -> int:
    return int(seed) + ROUTER_OFFSET


def distill_seed(seed: int) -> int:
    return int(seed) + DISTILL_OFFSET


def partition_stream_seed(seed: int, index: int) -> int:
    return int(seed) + PARTITION_STRIDE * int(index)


def data_order_seed(seed: int) -> int:
    return int(seed) + DATA_ORDER_OFFSET


def partition_order_seed(seed: int, cluster: int) -> int:
    # Mixed, not added: cluster k's order must not be cluster k+1's of a run seeded one higher.
    return stream_seed(int(seed) + PARTITION_ORDER_OFFSET, cluster)


def router_shards_seed(seed: int, partition: int) -> int:
    return stream_seed(int(seed) + ROUTER_SHARDS_OFFSET, partition)


def grid_noise_seed(seed: int, index: int) -> int:
    """The noise of point ``index`` of a fixed evaluation grid (the held-out FM loss's t grid)."""
    return int(seed) * 1_000_003 + int(index)


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same draws on any device."""
    return torch.Generator().manual_seed(int(seed))
