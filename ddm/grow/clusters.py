"""Growing a clustering by new samples, without touching the clusters that receive none.

Two ways (``extend.mode``):

- ``new_cluster``: every new sample goes to a new cluster K; its centroid (the
  new samples' mean embedding) is appended, so later images can be assigned to it;
- ``assign``: each new sample goes to the cluster the original clustering
  would have given it (``ddm.cluster.nearest``); centroids stay as they are.

``grown_report`` turns the old report into the new one: a new
``clustering_id`` over every (key, cluster) pair, ``parent`` the old id,
``lineage`` (ancestor id -> its K) and ``cluster_ids`` (per cluster, the id
its members were last set under: ``ddm.lineage``), plus one entry in
``extensions`` saying what was added. Numpy only.
"""

from __future__ import annotations

import numpy as np

from ddm.cluster import clustering_id
from ddm.cluster.nearest import nearest_cluster
from ddm.errors import BadInput
from ddm.lineage import cluster_ids

MODES = ("new_cluster", "assign")


def check_mode(mode: str, method: str) -> str:
    """``extend.mode``, refused when unknown or when the clustering has no centroids to assign by."""
    if mode not in MODES:
        raise BadInput(f"extend.mode={mode!r} is not one of {list(MODES)}")
    if mode == "assign" and method == "random":
        raise BadInput(
            "extend.mode=assign gives each new image the cluster of its nearest centroid, but this run's "
            "clustering is random (cluster.method=random: no centroids): use extend.mode=new_cluster"
        )
    return mode


def new_labels(mode: str, k: int, embeddings: np.ndarray | None, centroids: dict, spherical: bool) -> np.ndarray:
    """The cluster of each new sample: ``k`` for all (new_cluster), else each one's nearest cluster among the k.

    ``centroids``: ``centroids`` [K, D] (flat) or ``fine_centroids`` [F, D] and
    ``fine_to_coarse`` [F] (two-stage), as the cluster stage saved them.
    """
    if mode == "new_cluster":
        return np.full(len(embeddings), k, dtype=np.int32)
    if centroids.get("fine_centroids") is not None:
        labels = nearest_cluster(
            embeddings, centroids["fine_centroids"], fine_to_coarse=centroids["fine_to_coarse"], spherical=spherical
        )
    else:
        labels = nearest_cluster(embeddings, centroids["centroids"], spherical=spherical)
    return labels.astype(np.int32)


def grown_centroids(centroids: dict, embeddings: np.ndarray, k: int, spherical: bool) -> dict:
    """new_cluster: the centroid arrays with the new cluster ``k``'s mean embedding appended (None stays None)."""
    mean = embeddings.mean(axis=0, keepdims=True).astype(np.float32)
    if spherical:
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
    out = dict(centroids)
    if centroids.get("centroids") is not None:
        out["centroids"] = np.concatenate([centroids["centroids"], mean])
    if centroids.get("fine_centroids") is not None:
        out["fine_centroids"] = np.concatenate([centroids["fine_centroids"], mean])
        out["fine_to_coarse"] = np.concatenate([centroids["fine_to_coarse"], [k]]).astype(
            centroids["fine_to_coarse"].dtype
        )
    return out


def grown_report(report: dict, keys: list[str], labels: np.ndarray, extension: dict, keys_sha256: str) -> dict:
    """The clustering report after growth (see the module docstring); ``keys``/``labels``: every sample, new last."""
    old_k, parent = int(report["k"]), report["clustering_id"]
    k = int(labels.max()) + 1 if len(labels) else old_k
    k = max(k, old_k)
    cid = clustering_id(keys, labels)
    old_labels = labels[: int(report["num_samples"])]
    added = np.bincount(labels[len(old_labels) :], minlength=k)
    touched = [c for c in range(k) if added[c] > 0]
    ids = cluster_ids(dict(report, num_clusters=old_k)) + [cid] * (k - old_k)
    ids = [cid if c in touched else ids[c] for c in range(k)]
    lineage = {**(report.get("lineage") or {}), parent: old_k}
    # Only the ancestors a kept cluster still names need remembering.
    lineage = {i: n for i, n in lineage.items() if i in ids}
    entry = dict(
        extension, parent=parent, clustering_id=cid, k_before=old_k, k=k, clusters=touched, added=added.tolist()
    )
    return dict(
        report,
        # the grown clustering is no longer k-means of one set of embeddings (extend embeds the new
        # images afterwards): nothing left for the partition stage to compare embeddings_id with
        embeddings_id=None,
        k=k,
        num_samples=len(keys),
        sizes=np.bincount(labels, minlength=k).tolist(),
        keys_sha256=keys_sha256,
        clustering_id=cid,
        parent=parent,
        lineage=lineage,
        cluster_ids=ids,
        extensions=[*(report.get("extensions") or []), entry],
    )
