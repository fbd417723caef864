"""Splitting the dataset's shards into one shard set per cluster, in a single pass.

PNG bytes are copied through untouched, so an expert sees exactly the pixels
that were embedded and clustered. Shard counts are planned per cluster before
writing, because webdataset starves (or hangs at the end of an epoch) when a
shard set has fewer shards than ranks x data-loader workers.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from ddm.data.shards import ShardSetWriter, iter_samples, shard_paths
from ddm.errors import BadInput
from ddm.io import sha256_strings

# Data-manifest fields every partition carries, so an expert can build its model
# from its own partition's manifest alone.
COPIED_FIELDS = ("image_size", "channels", "num_classes", "class_names")


def shard_size_for(num_samples: int, min_shards: int, target_size: int) -> int:
    """Samples per shard for a cluster of ``num_samples``.

    About ``target_size`` per shard, but small enough for at least ``min_shards``
    shards; a cluster with fewer samples than that gets one sample per shard.
    """
    if min_shards < 1 or target_size < 1:
        raise BadInput(
            f"cluster.min_shards_per_partition={min_shards} and cluster.partition_shard_size="
            f"{target_size} must both be at least 1"
        )
    # floor (not ceil) guarantees ceil(n / size) >= min_shards.
    return max(1, min(target_size, num_samples // min_shards))


def write_partitions(
    data_dir: str | os.PathLike,
    data_manifest: dict,
    keys: Sequence[str],
    cluster: np.ndarray,
    folders: Sequence[str | os.PathLike],
    clustering_id: str,
    *,
    min_shards: int,
    target_size: int,
) -> list[dict]:
    """Write cluster ``k``'s samples to ``folders[k]`` as a shard set; return the K manifests.

    ``keys``/``cluster`` are the assignments in dataset order; the data shards
    must hold the same keys in the same order (checked sample by sample).
    Each manifest records cluster, num_clusters, clustering_id, keys_sha256 (this
    cluster's keys in order), class_counts and the data's image fields. On any
    error no manifest is written, so no partition looks complete.
    """
    num_clusters = len(folders)
    keys, cluster = np.asarray(keys, dtype=str), np.asarray(cluster)
    sizes = np.bincount(cluster, minlength=num_clusters)
    copied = {f: data_manifest[f] for f in COPIED_FIELDS if f in data_manifest}
    class_counts = [Counter() for _ in range(num_clusters)]
    with ExitStack() as stack:
        writers = []
        for k, folder in enumerate(folders):
            writer = ShardSetWriter(
                folder,
                shard_size_for(int(sizes[k]), min_shards, target_size),
                cluster=k,
                num_clusters=num_clusters,
                clustering_id=clustering_id,
                keys_sha256=sha256_strings(keys[cluster == k]),
                **copied,
            )
            writers.append(stack.enter_context(writer))
        count = 0
        for sample in iter_samples(shard_paths(data_dir, data_manifest), decode=False):
            if count >= len(keys) or sample["key"] != keys[count]:
                expected = keys[count] if count < len(keys) else "<end of assignments>"
                raise BadInput(
                    f"data sample {count} is {sample['key']!r} but the assignments expect "
                    f"{expected!r}: clusters/ were made from different data; rerun cluster "
                    f"with redo=true"
                )
            k = int(cluster[count])
            writers[k].write(sample["key"], None, sample["label"], sample.get("caption"), png=sample["png"])
            class_counts[k][sample["label"]] += 1
            count += 1
        if count != len(keys):
            raise BadInput(
                f"data/ holds {count} samples but the assignments cover {len(keys)}: rerun cluster with redo=true"
            )
        # Known only now, and needed before the writers close and write their manifests.
        for k, counts in enumerate(class_counts):
            writers[k].extra["class_counts"] = {str(label): n for label, n in sorted(counts.items())}
    return [w.manifest for w in writers]
