"""Clustering the dataset into K parts, and reading the result back.

Algorithms live in ``ddm.cluster.kmeans`` (flat, two-stage, random); writing
one shard set per cluster lives in ``ddm.cluster.shard_split``. This module holds
what later stages need to *read* a clustering, with numpy only (no faiss)::

    from ddm.cluster import load_assignments
    a = load_assignments(RunDir(run_dir).assignments)
    a.keys, a.cluster, a.num_clusters, a.clustering_id
    a.cluster_of()["fmnist-train-000042"]   # -> 3

``clustering_id`` (16 hex characters) is a digest of every (key, cluster) pair.
Each artefact made from a clustering records it (partition manifests, expert and
router records), so a mismatch shows that something was built from an older clustering.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm.errors import BadInput, MissingInput
from ddm.io import atomic_path, load_npz, remake_hint, sha256_strings


def clustering_id(keys, cluster) -> str:
    """First 16 hex characters of the sha256 over the (key, cluster id) pairs in dataset order."""
    return sha256_strings(f"{key}\t{int(c)}" for key, c in zip(keys, cluster))[:16]


@dataclass
class Assignments:
    """The cluster of every sample, in dataset order (the order of data/ shards and their samples)."""

    keys: np.ndarray  # str [N]
    cluster: np.ndarray  # int32 [N]
    num_clusters: int

    @property
    def clustering_id(self) -> str:
        return clustering_id(self.keys, self.cluster)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.cluster, minlength=self.num_clusters).tolist()

    def cluster_of(self) -> dict[str, int]:
        """key -> cluster id, for joining with samples read from shards."""
        return dict(zip(self.keys.tolist(), self.cluster.tolist()))


def save_assignments(path: str | os.PathLike, keys, cluster) -> None:
    """Write assignments.npz atomically: ``keys`` (str array) and ``cluster`` (int32 array)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, keys=np.asarray(keys, dtype=str), cluster=np.asarray(cluster, dtype=np.int32))


def load_assignments(path: str | os.PathLike, num_clusters: int | None = None) -> Assignments:
    """Read assignments.npz; K is taken from the ids unless given (a report's ``k``)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"no cluster assignments at {path}: run the cluster stage first")
    arrays = load_npz(path, ("keys", "cluster"))  # a damaged file names itself
    keys, cluster = arrays["keys"], arrays["cluster"]
    if keys.ndim != 1 or cluster.shape != keys.shape or not np.issubdtype(cluster.dtype, np.integer):
        raise BadInput(
            f"{path} holds {keys.shape} keys and {cluster.shape} cluster ids of type {cluster.dtype}: it is not "
            f"a clustering's assignments; remake it with {remake_hint(path)}"
        )
    cluster = cluster.astype(np.int32)
    k = num_clusters if num_clusters is not None else int(cluster.max()) + 1 if len(cluster) else 0
    return Assignments(keys=keys, cluster=cluster, num_clusters=k)
