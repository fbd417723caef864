"""Splitting the dataset's shards into one shard set per cluster, each in a seeded random order.

Image bytes (PNG or JPEG, as ``data/`` stores them) are copied through untouched,
with each sample's provenance (``json``), so an expert sees exactly the pixels
that were embedded and clustered. Shard counts are planned per cluster before
writing, because webdataset starves (or hangs at the end of an epoch) when a
shard set has fewer shards than ranks x data-loader workers.

Each cluster's samples are stored in a permutation of their own, drawn with
``ddm.seeds.partition_order_seed(seed, k)``: an expert's loader shuffles within
a small buffer only, so a partition must not pass on the order of ``data/``,
which may be sorted (existing shards brought with ``data=webdataset`` keep their
order inside each input shard).

How, for a million samples and more: the order is decided on the index alone
(each cluster's permutation, 8 bytes per sample, and the byte range of every
sample of ``data/``, 20 bytes per sample: under 30 MB for 1M samples), then each
output shard is gathered by seeking into ``data/``'s tars in file order, one
input file open at a time. Memory holds one output shard of images at most.
Sending each sample to a random output shard as ``data/`` streams past would
read sequentially, but needs every output shard of every cluster open at once
(about N / partition_shard_size files, past common open-file limits for
ImageNet) and would still leave each shard in input order, or write the data
twice to fix that. The price here is random reads of ``data/``, local by then.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ddm.data.shard_format import stored_image
from ddm.data.shard_index import Spans, index_spans, read_spans
from ddm.data.shards import ShardSetWriter, shard_paths, shards_digest
from ddm.data.sources.order import PERMUTED_SAMPLES
from ddm.errors import BadInput
from ddm.io import sha256_strings
from ddm.seeds import partition_order_seed

# Data-manifest fields every partition carries, so an expert can build its model
# from its own partition's manifest alone.
COPIED_FIELDS = ("image_size", "channels", "num_classes", "class_names", "image_format", "quality")


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


def cluster_order(cluster: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Dataset positions of cluster ``k``'s samples, in the order its partition stores them."""
    members = np.flatnonzero(cluster == k)
    return members[np.random.default_rng(partition_order_seed(seed, k)).permutation(len(members))]


def _mismatch(keys: np.ndarray):
    def error(position: int, found: str | None) -> BadInput:
        if found is None:
            return BadInput(
                f"data/ holds {position} samples but the assignments cover {len(keys)}: rerun cluster with redo=true"
            )
        expected = str(keys[position]) if position < len(keys) else "<end of assignments>"
        return BadInput(
            f"data sample {position} is {found!r} but the assignments expect {expected!r}: clusters/ were made "
            f"from different data; rerun cluster with redo=true"
        )

    return error


def _copy(spans: Spans, positions: np.ndarray, keys: np.ndarray, writer: ShardSetWriter, counts: Counter) -> None:
    """Write the samples at ``positions`` of data/ to ``writer`` in that order, counting their labels."""
    raws = read_spans(spans, positions)
    for i in positions.tolist():
        raw, key = raws[i], str(keys[i])
        encoded = stored_image(raw)
        if raw.get("key") != key or encoded is None:
            raise BadInput(
                f"{spans.paths[spans.shard[i]]} changed while it was being partitioned (sample {key!r} "
                f"is no longer where it was): rerun prepare, cluster and partition with redo=true"
            )
        label = int(raw["cls"]) if "cls" in raw else -1
        caption = raw["txt"].decode() if "txt" in raw else None
        meta = json.loads(raw["json"]) if "json" in raw else None  # where it came from travels with it
        writer.write(key, None, label, caption, encoded=encoded, meta=meta)
        counts[label] += 1


@dataclass(frozen=True)
class _Split:
    """What writing any one cluster's shard set needs: shared by the clusters, built once."""

    spans: Spans
    keys: np.ndarray
    cluster: np.ndarray
    folders: Sequence[str | os.PathLike]
    clustering_id: str
    copied: dict
    source: str
    min_shards: int
    target_size: int
    seed: int
    extra: dict

    def write(self, k: int) -> dict:
        """Cluster ``k``'s shard set, its manifest written last (by the writer, when the block closes)."""
        order = cluster_order(self.cluster, k, self.seed)
        size = shard_size_for(len(order), self.min_shards, self.target_size)
        with ShardSetWriter(
            self.folders[k],
            size,
            cluster=k,
            num_clusters=len(self.folders),
            clustering_id=self.clustering_id,
            keys_sha256=sha256_strings(self.keys[order]),
            order=dict(permuted=PERMUTED_SAMPLES, seed=int(self.seed)),
            data_shards_sha256=self.source,
            **self.copied,
            **self.extra.get(k, {}),
        ) as writer:
            counts: Counter = Counter()
            for lo in range(0, len(order), size):  # one output shard at a time: bounded memory
                _copy(self.spans, order[lo : lo + size], self.keys, writer, counts)
            # Known only now, and needed before the writer closes and writes its manifest.
            writer.extra["class_counts"] = {str(label): n for label, n in sorted(counts.items())}
        return writer.manifest


_split: _Split | None = None  # in a worker process: set once at its start (fork shares the index, unpickled)


def _start(split: _Split) -> None:
    global _split
    _split = split


def _write_one(k: int) -> dict:
    return _split.write(k)


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
    seed: int,
    only: Sequence[int] | None = None,
    extra: dict[int, dict] | None = None,
    workers: int = 1,
) -> list[dict]:
    """Write cluster ``k``'s samples to ``folders[k]`` as a shard set, in ``cluster_order``; return the K manifests.

    ``only``: write just these clusters (a grown run rewrites the clusters that
    changed and leaves the others' shard sets as they are); their manifests are
    returned in that order. ``extra``: more manifest fields per cluster id.
    ``keys``/``cluster`` are the assignments in dataset order; the data shards
    must hold the same keys in the same order (checked sample by sample).
    Each manifest records cluster, num_clusters, clustering_id, keys_sha256 (this
    cluster's keys in stored order), order ({"permuted": "samples", "seed": seed}),
    class_counts, the data's image fields and ``data_shards_sha256``, which names the
    data shards it was copied from (``ddm.data.shards.shards_digest`` of ``data_manifest``).
    A cluster's manifest is written when its shards are whole, so a partition never looks
    complete before it is. ``workers``: clusters written side by side by that many processes
    (each cluster's shards are the same bytes either way).
    """
    keys, cluster = np.asarray(keys, dtype=str), np.asarray(cluster)
    split = _Split(
        spans=index_spans(shard_paths(data_dir, data_manifest), keys, _mismatch(keys)),
        keys=keys,
        cluster=cluster,
        folders=list(folders),
        clustering_id=clustering_id,
        copied={f: data_manifest[f] for f in COPIED_FIELDS if f in data_manifest},
        source=shards_digest(data_manifest),
        min_shards=min_shards,
        target_size=target_size,
        seed=seed,
        extra=extra or {},
    )
    todo = [k for k in range(len(folders)) if only is None or k in only]
    workers = min(int(workers), len(todo))
    if workers <= 1:
        return [split.write(k) for k in todo]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(split,)) as pool:
        return list(pool.map(_write_one, todo))
