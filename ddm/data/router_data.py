"""What the router trains and is measured on: every partition of a run, split into training and held-out shards.

Unlike an expert, which reads only its own partition, the router reads all of
them; they must come from one clustering (or, in a run grown by ``ddm extend``,
each from the ancestor its cluster was kept from: ``ddm.lineage``), or
its classes would not be the experts' clusters. One shard of each partition (when it has more than one),
drawn with the run's seed, is held out, and the held-out evaluation set is drawn
from those shards. Drawn rather than taken from the front, so that what the
router holds out (and, with ``router.sample_fraction`` < 1, trains on) does not
depend on how a partition's shards happen to be ordered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest
from ddm.errors import BadInput, MissingInput
from ddm.images import to_model_space
from ddm.io import read_json
from ddm.lineage import cluster_ids


def load_partitions(rd: RunDir) -> tuple[dict, list[dict]]:
    """The partition index and every cluster's manifest, checked to come from one clustering."""
    index_path = rd.partitions_index
    if not index_path.exists():
        raise MissingInput(f"no partitions at {rd.partitions}: run `ddm partition` first")
    index = read_json(index_path)
    manifests = [load_manifest(rd.partition(k)) for k in range(int(index["num_clusters"]))]
    # a grown run keeps the partitions that did not change under the ancestor they were written under
    expected = cluster_ids(index)
    found = [m["clustering_id"] for m in manifests]
    if found != expected or any(int(m["cluster"]) != k for k, m in enumerate(manifests)):
        raise BadInput(
            f"the partitions under {rd.partitions} come from clusterings {found}, but its manifest.json expects "
            f"{expected} (clustering {index['clustering_id']}); rerun `ddm partition redo=true`"
        )
    return index, manifests


def split_shards(urls: list[str], sizes: list[int], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards) of one partition whose shards hold ``sizes`` samples, drawn with ``seed``.

    With two or more shards one full shard (one of the largest: the last may
    hold a remainder), drawn at random, is held out, and the router trains on a
    random ``fraction`` of the others (at least one shard), listed in stored
    order; the two never share a shard. A partition of one shard is trained and
    measured on that shard. The same seed draws the same shards (on every rank).
    """
    if not 0 < fraction <= 1:
        raise BadInput(f"router.sample_fraction={fraction}: use a fraction of each partition's shards in (0, 1]")
    if len(urls) != len(sizes):
        raise BadInput(f"{len(urls)} shards but {len(sizes)} shard sizes: the partition manifest is inconsistent")
    if len(urls) == 1:
        return list(urls), list(urls)
    rng = np.random.default_rng(seed)
    full = np.flatnonzero(np.asarray(sizes) == max(sizes))
    held = int(rng.choice(full))
    rest = np.array([i for i in range(len(urls)) if i != held])
    n = max(1, math.ceil(fraction * len(rest)))
    train = np.sort(rng.choice(rest, size=n, replace=False))
    return [urls[i] for i in train], [urls[held]]


def eval_set(manifests: list[dict], held: list[list[str]], total: int, captions=None):
    """``(x0, y, k)``: up to ``total`` held-out samples, split between clusters in proportion to their sizes.

    ``x0`` [N, C, H, W] in model space, ``y`` [N] class labels, ``k`` [N] the
    cluster each sample belongs to. Every cluster gets at least one sample.
    With ``captions`` (a ``ddm.text.captions.Captions``) the fourth item is
    the list of the samples' captions: ``(x0, y, k, texts)``.
    """
    sizes = np.array([m["num_samples"] for m in manifests], dtype=float)
    quota = np.maximum(1, np.round(total * sizes / sizes.sum())).astype(int)
    xs, ys, ks, texts = [], [], [], []
    for k, (urls, q) in enumerate(zip(held, quota)):
        for i, s in enumerate(iter_samples(urls)):
            if i >= q:
                break
            # latent shard sets hold model-space latents already; pixel ones uint8 images
            xs.append(torch.from_numpy(s["latent"].astype(np.float32)) if "latent" in s else to_model_space(s["image"]))
            ys.append(s["label"])
            ks.append(k)
            if captions is not None:
                texts.append(captions(s.get("caption"), s["label"], s["key"]))
    out = (torch.stack(xs), torch.tensor(ys), torch.tensor(ks))
    return out if captions is None else (*out, texts)
