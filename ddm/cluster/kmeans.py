"""Partitioning a dataset by its embeddings: flat k-means, the paper's two-stage k-means, and a random baseline.

Plain functions on numpy arrays, usable without Hydra or a run directory::

    from ddm.cluster.kmeans import flat_kmeans, two_stage_kmeans, random_partition

    result = two_stage_kmeans(x, k=8, fine_k=1024, niter=20, seed=0)
    result.labels            # int32 [N], cluster of each row of x
    result.fine_to_coarse    # int32 [fine_k], coarse cluster of each fine centroid

Every result is renumbered by decreasing cluster size (ties: the cluster whose
first member comes first), so cluster ids do not depend on the order in which
k-means happened to find the clusters. Nothing here balances sizes: the method
keeps the clusters the data has.

Seeding is k-means++ (computed here, then handed to faiss as its initial
centroids): faiss's default of k random points often puts two centroids in one
well-separated group and none in another, and Lloyd iterations never repair that.

At scale, ``x`` may be a ``ddm.cluster.rows.Rows`` (memory-mapped float16 or
float32 shards) and ``train`` a sample of it: k-means learns its centroids on
``train`` alone, then every row of ``x`` is assigned block by block, converted
to float32 one block at a time. faiss runs on the GPUs when it was built for
them and sees one (``faiss_gpus``), on the CPU otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ddm.errors import BadInput

# faiss's loader logs each CPU-specific build it tries (and the ImportError of the
# ones it skips) at INFO; under Hydra's root logger that reads like a failure.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

# Rows per block when assigning samples to centroids: bounds the temporary
# memory (block x D floats) whatever the dataset size.
CHUNK = 16384
# faiss trains on at most this many points per centroid (its own default); the
# final assignment still covers every sample.
MAX_POINTS_PER_CENTROID = 256
# k-means++ seeding looks at a random subset of this many points per centroid:
# enough to find every dense region, and O(k^2) instead of O(N k).
SEED_POINTS_PER_CENTROID = 64


def faiss_gpus() -> int:
    """GPUs faiss uses here: 0 with faiss-cpu or on a machine without one."""
    count = getattr(faiss, "get_num_gpus", None)
    return int(count()) if count is not None else 0


def _flat_index(d: int, spherical: bool):
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    return faiss.index_cpu_to_all_gpus(index) if faiss_gpus() else index


@dataclass
class Clustering:
    """What a clustering method produced. Fields a method does not use are None."""

    labels: np.ndarray  # int32 [N]: cluster of each sample
    centroids: np.ndarray | None = None  # float32 [k, D]
    inertia: float | None = None  # mean squared distance to the assigned centroid
    fine_centroids: np.ndarray | None = None  # two_stage: float32 [fine_k, D]
    fine_to_coarse: np.ndarray | None = None  # two_stage: int32 [fine_k]
    fine_inertia: float | None = None  # two_stage: mean squared distance to the nearest fine centroid
    fine_k: int | None = None  # two_stage: fine centroids actually used


class EmptyClusterError(BadInput):
    """k-means produced a cluster that no sample is nearest to."""


def check_k(k: int, n: int) -> None:
    """Raise a ValueError that says what to change when k clusters cannot be made from n samples."""
    if k < 1:
        raise BadInput(f"cluster.k={k}: the number of clusters must be at least 1")
    if k > n:
        raise BadInput(
            f"cluster.k={k} is larger than the number of samples N={n}: every cluster needs "
            f"at least one sample; set cluster.k to at most {n} or prepare more data"
        )


def effective_fine_k(fine_k: int, k: int, n: int) -> int:
    """Fine centroids two-stage k-means can use: at most N // 4 (a centroid needs a few samples), never below k."""
    if fine_k < k:
        raise BadInput(
            f"cluster.fine_k={fine_k} is smaller than cluster.k={k}: the coarse clusters are made "
            f"of fine centroids, so fine_k must be at least k"
        )
    return max(k, min(fine_k, n // 4))


def kmeans_plusplus(x: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of x, each drawn with probability ~ weight * D^2.

    Runs on a seeded subset of at most ``SEED_POINTS_PER_CENTROID * k`` rows, so
    its cost does not grow with the dataset. When fewer than k distinct points
    exist, the remaining centroids are duplicates (and a cluster will end up empty).
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    limit = SEED_POINTS_PER_CENTROID * k
    if n > limit:
        idx = np.sort(rng.choice(n, size=limit, replace=False))
        x, w = x[idx], w[idx]
    x = np.ascontiguousarray(x, dtype=np.float32)
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)

    def sq_dist_to(row: np.ndarray) -> np.ndarray:
        # |x|^2 + |c|^2 - 2 x.c: one matrix-vector product instead of an N x D difference.
        return np.maximum(sq_norms + float(row @ row) - 2.0 * (x @ row).astype(np.float64), 0.0)

    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[_draw(rng, w)]
    nearest = sq_dist_to(centroids[0])
    for j in range(1, k):
        p = w * nearest
        # All mass at distance 0: every point coincides with a chosen centroid; any pick is as good.
        centroids[j] = x[_draw(rng, p) if p.sum() > 0 else rng.integers(len(x))]
        nearest = np.minimum(nearest, sq_dist_to(centroids[j]))
    return centroids


def _draw(rng: np.random.Generator, p: np.ndarray) -> int:
    """Index drawn with probability proportional to p (p >= 0, sum > 0)."""
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))


def train_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    spherical: bool = False,
    weights: np.ndarray | None = None,
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
) -> np.ndarray:
    """faiss k-means from a k-means++ start; returns float32 centroids [k, D]."""
    x = np.ascontiguousarray(x if isinstance(x, np.ndarray) else x[0 : len(x)], dtype=np.float32)
    init = kmeans_plusplus(x, k, seed, weights)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed % 2**31,
        spherical=spherical,
        verbose=False,
        max_points_per_centroid=max_points_per_centroid,
        # faiss warns below 39 points per centroid; small runs are legitimate here.
        min_points_per_centroid=1,
        gpu=faiss_gpus() > 0,
    )
    km.train(x, weights=None if weights is None else np.asarray(weights, dtype=np.float32), init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(x, centroids: np.ndarray, *, spherical: bool = False, chunk: int | None = None) -> tuple[np.ndarray, float]:
    """Nearest centroid of every row, block by block: (int32 labels [N], mean squared L2 distance).

    ``x``: an array (float16 or float32, memory-mapped or not) or ``Rows``; only one block of
    ``chunk`` rows is in float32 at a time. Spherical k-means compares by inner product (as faiss
    did while training); the reported distance is the squared L2 distance either way.
    """
    chunk = chunk or CHUNK  # read when called, so a caller (a test) may change the module's block size
    index = _flat_index(centroids.shape[1], spherical)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    labels = np.empty(len(x), dtype=np.int32)
    total = 0.0
    for start in range(0, len(x), chunk):
        block = np.ascontiguousarray(x[start : start + chunk], dtype=np.float32)
        score, nearest = index.search(block, 1)
        nearest, score = nearest[:, 0], score[:, 0]
        labels[start : start + len(block)] = nearest
        sq = np.einsum("ij,ij->i", block, block) + c_sq[nearest] - 2 * score if spherical else score
        total += float(np.maximum(sq, 0).sum(dtype=np.float64))
    return labels, total / max(len(x), 1)


def mean_sq_distance(x, centroids: np.ndarray, labels: np.ndarray, chunk: int | None = None) -> float:
    """Mean squared L2 distance of each row to the centroid it is assigned to (not necessarily its nearest)."""
    chunk = chunk or CHUNK
    total = 0.0
    for start in range(0, len(x), chunk):
        diff = np.asarray(x[start : start + chunk], dtype=np.float32) - centroids[labels[start : start + chunk]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total / max(len(x), 1)


def raise_if_empty(labels: np.ndarray, k: int) -> None:
    """EmptyClusterError naming the clusters that received no sample."""
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if len(empty):
        raise EmptyClusterError(
            f"k-means left cluster(s) {empty.tolist()} of cluster.k={k} empty over N={len(labels)} samples: "
            f"the embeddings have fewer distinct groups than clusters. Use a smaller cluster.k or "
            f"another cluster.seed"
        )


def renumber_by_size(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel clusters 0..k-1 by decreasing size, ties broken by smallest member index.

    Returns (new labels, order) with ``order[new_id] = old_id``.
    """
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    order = np.lexsort((first, -sizes))  # last key is the primary one
    new_id = np.empty(k, dtype=np.int32)
    new_id[order] = np.arange(k, dtype=np.int32)
    return new_id[labels], order


def flat_kmeans(
    x, k: int, *, niter: int = 20, seed: int = 0, spherical: bool = False, train: np.ndarray | None = None
) -> Clustering:
    """k-means with k centroids directly on the embeddings (learnt on ``train`` when given: a sample of x)."""
    check_k(k, len(x))
    centroids = train_kmeans(x if train is None else train, k, niter=niter, seed=seed, spherical=spherical)
    labels, inertia = assign(x, centroids, spherical=spherical)
    raise_if_empty(labels, k)
    labels, order = renumber_by_size(labels, k)
    return Clustering(labels=labels, centroids=centroids[order], inertia=inertia)


def two_stage_kmeans(
    x,
    k: int,
    *,
    fine_k: int = 1024,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    train: np.ndarray | None = None,
) -> Clustering:
    """The paper's scheme: fine_k centroids over the samples, then k coarse clusters over the fine centroids.

    The coarse k-means weights each fine centroid by its number of samples (all of x, when the fine
    centroids were learnt on ``train``, a sample of it), so coarse centroids approximate the means of
    their samples. Each sample belongs to the coarse cluster of its nearest fine centroid. ``fine_k``
    is capped at N // 4.
    """
    n = len(x)
    check_k(k, n)
    fine_k = effective_fine_k(fine_k, k, n)
    fine = train_kmeans(x if train is None else train, fine_k, niter=niter, seed=seed, spherical=spherical)
    fine_labels, fine_inertia = assign(x, fine, spherical=spherical)
    counts = np.bincount(fine_labels, minlength=fine_k)
    # Never subsample the fine centroids: there are few of them and each carries its weight.
    coarse = train_kmeans(
        fine, k, niter=niter, seed=seed, spherical=spherical, weights=counts, max_points_per_centroid=fine_k
    )
    fine_to_coarse, _ = assign(fine, coarse, spherical=spherical)
    labels = fine_to_coarse[fine_labels]
    del fine_labels
    raise_if_empty(labels, k)
    labels, order = renumber_by_size(labels, k)
    new_id = np.argsort(order).astype(np.int32)
    coarse = coarse[order]
    return Clustering(
        labels=labels,
        centroids=coarse,
        inertia=mean_sq_distance(x, coarse, labels),
        fine_centroids=fine,
        fine_to_coarse=new_id[fine_to_coarse],
        fine_inertia=fine_inertia,
        fine_k=fine_k,
    )


def random_partition(n: int, k: int, seed: int = 0) -> Clustering:
    """Baseline: a seeded uniform random assignment with sizes within one of each other."""
    check_k(k, n)
    rng = np.random.default_rng(seed)
    labels = np.empty(n, dtype=np.int32)
    # Dealing a shuffled deck round-robin gives every cluster floor(n/k) or ceil(n/k) samples.
    labels[rng.permutation(n)] = np.arange(n, dtype=np.int32) % k
    labels, _ = renumber_by_size(labels, k)
    return Clustering(labels=labels)
