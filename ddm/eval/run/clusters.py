"""The cluster of a held-out or training image of a run, as the router was trained to predict it.

Images of ``data/`` have their cluster in ``clusters/assignments.npz``. Other
images are embedded with the run's encoder and go where a training image
would (``ddm.cluster.nearest``). A random partition has no rule for new images.
"""

from __future__ import annotations

import numpy as np

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments
from ddm.data.shards import load_manifest
from ddm.data.sources import SourceMeta
from ddm.io import load_npy, read_json
from ddm.seeds import seed_everything
from ddm.settings import Embed
from ddm.settings.values import build

EMBED_BATCH = 512


def cluster_labels(rd: RunDir, keys: list, images: np.ndarray, seed: int) -> tuple[np.ndarray | None, str]:
    """The cluster of each image: ``(labels, how)``, or ``(None, why not)``.

    ``how`` is ``assignments`` when every key is in ``data/``, else
    ``nearest_centroid``; ``seed`` is the run's seed (random-init encoders are
    rebuilt from it). The ``router`` section of metrics.json records ``how``.
    """
    report = read_json(rd.cluster_report)
    known = load_assignments(rd.assignments, int(report["k"])).cluster_of()
    if all(k in known for k in keys):
        return np.asarray([known[k] for k in keys], dtype=np.int64), "assignments"
    if report.get("method") == "random":
        return None, "random partition: an image outside data/ has no cluster"
    return nearest_centroid(rd, report, images, seed), "nearest_centroid"


def nearest_centroid(rd: RunDir, report: dict, images: np.ndarray, seed: int) -> np.ndarray:
    """Clusters of uint8 ``images`` by the run's clustering rule (``report``: clusters/report.json)."""
    from ddm.cluster.nearest import nearest_cluster  # faiss: only when new images need it

    emb = embed_like_training(rd, images, seed)
    spherical = bool(report.get("spherical"))
    fine_path = rd.fine_centroids
    if fine_path.exists():
        fine = load_npy(fine_path)
        return nearest_cluster(emb, fine, fine_to_coarse=load_npy(rd.fine_to_coarse), spherical=spherical)
    return nearest_cluster(emb, load_npy(rd.centroids), spherical=spherical)


def embed_like_training(rd: RunDir, images: np.ndarray, seed: int) -> np.ndarray:
    """Embeddings [N, D] of uint8 ``images`` by the encoder the embed stage used on ``data/``."""
    from ddm.embed import build_encoder, load_embeddings_manifest

    manifest = load_embeddings_manifest(rd.embeddings)
    seed_everything(seed)  # as the embed stage does: random-init encoders must match
    encoder = build_encoder(
        build(Embed, manifest["encoder_config"], "embed"), SourceMeta.from_manifest(load_manifest(rd.data))
    )
    rows = np.concatenate([encoder(images[i : i + EMBED_BATCH]) for i in range(0, len(images), EMBED_BATCH)])
    # rounded as the run's rows were stored (embed.dtype), so they meet the centroids as the training rows did
    stored = np.dtype(manifest.get("dtype") or manifest["encoder_config"].get("dtype") or "float32")
    return rows.astype(stored).astype(np.float32)
