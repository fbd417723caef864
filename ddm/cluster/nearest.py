"""The cluster of an image outside the clustered data: the rule the cluster stage applied to its own images.

A two-stage clustering gives each sample the coarse cluster of its nearest
fine centroid, a flat one the nearest of its K centroids. New embeddings (a
held-out test split, say) follow the same rule, so they land where a training
image with the same embedding would have.
"""

from __future__ import annotations

import numpy as np

from ddm.cluster.kmeans import assign


def nearest_cluster(
    embeddings: np.ndarray, centroids: np.ndarray, *, fine_to_coarse: np.ndarray | None = None, spherical: bool = False
) -> np.ndarray:
    """Cluster id (int64 [N]) of each embedding [N, D] (float32 or float16, as the embed stage stored them).

    Flat: ``centroids`` are the K cluster centroids [K, D]. Two-stage: they are
    the fine centroids [fine_k, D] and ``fine_to_coarse`` [fine_k] maps each to
    its cluster. ``spherical`` as the clustering was trained (inner product).
    """
    nearest, _ = assign(embeddings, centroids, spherical=spherical)
    if fine_to_coarse is not None:
        nearest = np.asarray(fine_to_coarse)[nearest]
    return nearest.astype(np.int64)
