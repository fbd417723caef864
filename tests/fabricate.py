"""Tiny synthetic run directories for tests of later stages, built without the earlier ones."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from ddm.artifacts import RunDir
from ddm.config import settings
from ddm.data.shards import ShardSetWriter
from ddm.io import sha256_strings, write_json
from ddm.settings import Settings

# One expert or router job in seconds on 2 CPU cores, on a fabricated partition: the tests' one fast setting.
FAST_JOB = (
    "model.size=DiT-N/2",
    "island.num_workers=0",
    "island.threads=1",
    "expert.batch_size=8",
    "expert.warmup_steps=2",
    "expert.shuffle_buffer=10",
    "router.size=DiT-N/2",
    "router.batch_size=16",
    "router.shuffle_buffer=50",
    "router.warmup_steps=5",
    "router.eval_samples=200",
)


def cluster_image(k: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """Cluster k: a bright square in quadrant k (mod 4) on a noisy dark background; clearly separable."""
    img = rng.integers(0, 60, size=(size, size))
    h = size // 2
    r, c = divmod(k % 4, 2)
    img[r * h : (r + 1) * h, c * h : (c + 1) * h] += 180
    return img.clip(0, 255).astype(np.uint8)


def make_partitions(
    run_dir, sizes=(40, 40), num_classes=3, size=8, shard_size=10, clustering_id="c0ffee", seed=0
) -> RunDir:
    """Write partitions/cluster-KK shard sets plus the partition index, as the partition stage does."""
    rd = RunDir(run_dir)
    rng = np.random.default_rng(seed)
    K = len(sizes)
    for k, n in enumerate(sizes):
        keys = [f"syn-train-{k:02d}{i:06d}" for i in range(n)]
        labels = [int(i % num_classes) for i in range(n)]
        with ShardSetWriter(
            rd.partition(k),
            shard_size,
            cluster=k,
            num_clusters=K,
            clustering_id=clustering_id,
            keys_sha256=sha256_strings(keys),
            image_size=size,
            channels=1,
            num_classes=num_classes,
            class_names=None,
        ) as w:
            for key, y in zip(keys, labels):
                w.write(key, cluster_image(k, rng, size), y)
    write_json(
        rd.partitions / "manifest.json",
        dict(
            clustering_id=clustering_id,
            num_clusters=K,
            sizes=list(sizes),
            clusters=[rd.partition(k).name for k in range(K)],
        ),
    )
    return rd


def _override_value(value) -> str:
    """``value`` as a Hydra override writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def cluster_cfg(run: RunDir, method: str, **overrides) -> Settings:
    """The settings of the real conf/cluster/<method>.yaml in the run ``run``, for the cluster and partition stages
    alone.

    Keyword overrides use ``__`` for dots: ``cluster__k=2`` sets ``cluster.k``. They are given as command-line
    overrides, so ``seed=1`` moves ``cluster.seed`` too (``${seed}``) unless ``cluster__seed`` is given.
    """
    given = [f"{key.replace('__', '.')}={_override_value(value)}" for key, value in overrides.items()]
    return settings([f"run_dir={run.root}", f"cluster={method}", *given])


def train_expert_on_two_ranks(rd: RunDir, cwd, *overrides: str, env: dict | None = None):
    """``python -m ddm train-expert`` as a 2-rank gloo DDP island on CPU; returns the finished process."""
    full_env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", **(env or {}))
    full_env.pop("DDM_STAGE", None)  # the ranks must not think they are children of another launch
    cmd = [
        sys.executable,
        "-m",
        "ddm",
        "train-expert",
        f"run_dir={rd.root}",
        *FAST_JOB,
        "island.devices=2",
        "island.strategy=ddp",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
