"""What the router trains and is measured on: every partition of a run, split into training and held-out shards.

Unlike an expert, which reads only its own partition, the router reads all of
them; they must come from one clustering, or its classes would not be the
experts' clusters. The first shard of each partition (when it has more than
one) is held out, and the held-out evaluation set is drawn from those shards.
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


def load_partitions(rd: RunDir) -> tuple[dict, list[dict]]:
    """The partition index and every cluster's manifest, checked to come from one clustering."""
    index_path = rd.partitions_index
    if not index_path.exists():
        raise MissingInput(f"no partitions at {rd.partitions}: run `ddm partition` first")
    index = read_json(index_path)
    manifests = [load_manifest(rd.partition(k)) for k in range(int(index["num_clusters"]))]
    ids = {m["clustering_id"] for m in manifests} | {index["clustering_id"]}
    if len(ids) != 1:
        raise BadInput(
            f"the partitions under {rd.partitions} come from different clusterings {sorted(ids)}; "
            f"rerun `ddm partition redo=true`"
        )
    return index, manifests


def split_shards(urls: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards) of one partition.

    The first shard (always a full one; the last may hold a remainder) is held
    out when there are two or more; the router trains on ``fraction`` of the
    rest (at least one shard). A partition of one shard is trained and
    measured on that shard.
    """
    held, train = (urls[:1], urls[1:]) if len(urls) > 1 else (urls, urls)
    n = max(1, math.ceil(fraction * len(train)))
    return train[:n], held


def eval_set(manifests: list[dict], held: list[list[str]], total: int):
    """``(x0, y, k)``: up to ``total`` held-out samples, split between clusters in proportion to their sizes.

    ``x0`` [N, C, H, W] in model space, ``y`` [N] class labels, ``k`` [N] the
    cluster each sample belongs to. Every cluster gets at least one sample.
    """
    sizes = np.array([m["num_samples"] for m in manifests], dtype=float)
    quota = np.maximum(1, np.round(total * sizes / sizes.sum())).astype(int)
    xs, ys, ks = [], [], []
    for k, (urls, q) in enumerate(zip(held, quota)):
        for i, s in enumerate(iter_samples(urls)):
            if i >= q:
                break
            xs.append(to_model_space(s["image"]))
            ys.append(s["label"])
            ks.append(k)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ks)
