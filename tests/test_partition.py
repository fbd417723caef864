"""The partition stage: per-cluster shard sets that hold exactly their cluster's samples, byte for byte."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.cluster import clustering_id, load_assignments, save_assignments
from ddm.cluster.shard_split import cluster_order, shard_size_for
from ddm.data.shards import ShardSetWriter, iter_samples, load_manifest, shard_paths, verify
from ddm.io import read_json, sha256_strings, write_json
from ddm.stages import cluster as cluster_stage
from ddm.stages import partition as partition_stage
from tests.fabricate import cluster_cfg


def png_bytes(image):
    """PNG at a compression level the shard writer does not use, so re-encoding would change the bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def make_data(root, n=120, shard_size=25):
    """data/ only (the random clustering needs no embeddings); returns (RunDir, keys)."""
    run = RunDir(root)
    rng = np.random.default_rng(0)
    keys = [f"toy-train-{i:06d}" for i in range(n)]
    with ShardSetWriter(
        run.data,
        shard_size,
        image_size=4,
        channels=3,
        num_classes=5,
        class_names=list("abcde"),
        keys_sha256=sha256_strings(keys),
    ) as writer:
        for key in keys:
            image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            meta = {"file": f"{key}.png"}  # provenance, which a partition carries with each sample
            writer.write(key, image, int(rng.integers(0, 5)), f"caption of {key}", ("png", png_bytes(image)), meta=meta)
    return run, keys


def cfg_for(run, method="random", **overrides):
    return cluster_cfg(run, method, **overrides)


def cluster_and_partition(run, **overrides):
    cfg = cfg_for(run, **overrides)
    cluster_stage.run(cfg)
    return partition_stage.run(cfg)


def test_partitions_hold_exactly_the_assigned_samples(tmp_path):
    run, keys = make_data(tmp_path, n=120)
    summary = cluster_and_partition(run, cluster__k=3)
    a = load_assignments(run.assignments)
    source = {s["key"]: s for s in iter_samples(shard_paths(run.data), decode=False)}
    seen = []
    for k in range(3):
        manifest = verify(run.partition(k))  # checksums match too
        samples = list(iter_samples(shard_paths(run.partition(k), manifest), decode=False))
        expected = [key for key, c in zip(keys, a.cluster) if c == k]
        stored = [s["key"] for s in samples]
        assert sorted(stored) == expected and stored != expected  # same set, not in dataset order:
        assert stored == [keys[i] for i in cluster_order(a.cluster, k, seed=0)]  # the seeded one
        for s in samples:
            assert s["encoded"] == source[s["key"]]["encoded"]  # copied, not re-encoded
            assert s["meta"] == {"file": f"{s['key']}.png"}
            assert s["label"] == source[s["key"]]["label"] and s["caption"] == source[s["key"]]["caption"]
        seen += expected
    assert sorted(seen) == keys  # every sample in exactly one partition
    assert summary["sizes"] == a.sizes and summary["clusters"] == ["cluster-00", "cluster-01", "cluster-02"]


def test_partition_manifests_describe_their_cluster(tmp_path):
    run, keys = make_data(tmp_path)
    cluster_and_partition(run, cluster__k=4)
    report = read_json(run.cluster_report)
    a = load_assignments(run.assignments)
    data = load_manifest(run.data)
    for k in range(4):
        m = load_manifest(run.partition(k))
        member_keys = [key for key, c in zip(keys, a.cluster) if c == k]
        stored = [s["key"] for s in iter_samples(shard_paths(run.partition(k), m), decode=False)]
        assert (m["cluster"], m["num_clusters"], m["clustering_id"]) == (k, 4, report["clustering_id"])
        assert sorted(stored) == member_keys and m["num_samples"] == len(member_keys)
        assert m["keys_sha256"] == sha256_strings(stored) and m["order"] == dict(permuted="samples", seed=0)
        for field in ("image_size", "channels", "num_classes", "class_names"):
            assert m[field] == data[field]
        labels = [s["label"] for s in iter_samples(shard_paths(run.partition(k), m), decode=False)]
        assert m["class_counts"] == {str(c): labels.count(c) for c in sorted(set(labels))}
    assert read_json(run.partitions / "manifest.json")["clustering_id"] == report["clustering_id"]


@pytest.mark.parametrize(
    "n,min_shards,target",
    [
        (1000, 8, 100),
        (1000, 8, 1000),
        (10, 8, 1000),
        (15, 8, 1000),
        (8, 8, 1000),
        (7, 8, 1000),
        (1, 8, 1000),
        (64, 8, 3),
    ],
)
def test_shard_size_gives_enough_shards(n, min_shards, target):
    size = shard_size_for(n, min_shards, target)
    shards = math.ceil(n / size)
    assert 1 <= size <= target
    if n >= min_shards:
        assert shards >= min_shards
    else:
        assert size == 1 and shards == n
    if n >= min_shards * target:
        assert size == target  # large clusters get the configured size


def test_min_shards_per_partition_respected(tmp_path):
    run, _ = make_data(tmp_path, n=90)
    # 3 clusters of 30 samples: 30 // 8 = 3 per shard -> 10 shards, although 1000 per shard was asked.
    summary = cluster_and_partition(run, cluster__k=3, cluster__min_shards_per_partition=8)
    assert summary["num_shards"] == [10, 10, 10]
    for k in range(3):
        assert len(load_manifest(run.partition(k))["shards"]) >= 8


def test_tiny_clusters_get_one_sample_per_shard(tmp_path):
    run, _ = make_data(tmp_path, n=20)
    summary = cluster_and_partition(run, cluster__k=4, cluster__min_shards_per_partition=8)
    assert summary["sizes"] == [5, 5, 5, 5] and summary["num_shards"] == [5, 5, 5, 5]


def test_large_clusters_use_the_target_shard_size(tmp_path):
    run, _ = make_data(tmp_path, n=120)
    summary = cluster_and_partition(
        run, cluster__k=1, cluster__min_shards_per_partition=2, cluster__partition_shard_size=50
    )
    assert [s["num_samples"] for s in load_manifest(run.partition(0))["shards"]] == [50, 50, 20]
    assert summary["num_shards"] == [3]


def test_skip_unless_redo(tmp_path):
    run, _ = make_data(tmp_path)
    first = cluster_and_partition(run, cluster__k=2)
    tar = run.partition(0) / "shard-000000.tar"
    tar.unlink()
    assert partition_stage.run(cfg_for(run, cluster__k=2)) == first  # same clustering: skipped
    assert not tar.exists()
    assert partition_stage.run(cfg_for(run, cluster__k=2, redo=True)) == first
    assert tar.exists()


def test_reclustering_rebuilds_partitions_and_changes_the_id(tmp_path):
    run, _ = make_data(tmp_path)
    first = cluster_and_partition(run, cluster__k=3)
    # Recluster (another seed, fewer clusters); partition without redo must notice and rebuild.
    cluster_stage.run(cfg_for(run, cluster__k=2, seed=1, redo=True))
    second = partition_stage.run(cfg_for(run, cluster__k=2, seed=1))
    new_id = read_json(run.cluster_report)["clustering_id"]
    assert second["clustering_id"] == new_id != first["clustering_id"]
    assert sorted(p.name for p in run.partitions.glob("cluster-*")) == ["cluster-00", "cluster-01"]
    for k in range(2):
        assert load_manifest(run.partition(k))["clustering_id"] == new_id


def test_clustering_id_follows_the_assignments(tmp_path):
    run, _ = make_data(tmp_path, n=40)
    cluster_and_partition(run, cluster__k=2)
    a = load_assignments(run.assignments)
    other = int(np.flatnonzero(a.cluster != a.cluster[0])[0])
    moved = a.cluster.copy()
    moved[[0, other]] = moved[[other, 0]]  # same sizes, two samples swapped
    assert clustering_id(a.keys, moved) != a.clustering_id == load_manifest(run.partition(0))["clustering_id"]


def test_assignments_not_matching_the_report_are_refused(tmp_path):
    run, keys = make_data(tmp_path, n=40)
    cluster_stage.run(cfg_for(run, cluster__k=2))
    save_assignments(run.assignments, keys, np.zeros(40, dtype=np.int32))  # edited behind the report's back
    with pytest.raises(ValueError, match="rerun cluster with redo=true"):
        partition_stage.run(cfg_for(run))
    assert not (run.partitions / "manifest.json").exists()


def test_data_changed_since_clustering_is_refused(tmp_path):
    run, keys = make_data(tmp_path, n=40)
    cluster_stage.run(cfg_for(run, cluster__k=2))
    manifest = load_manifest(run.data)
    manifest["keys_sha256"] = "0" * 64
    write_json(run.data_manifest, manifest)
    with pytest.raises(ValueError, match="rerun cluster with redo=true"):
        partition_stage.run(cfg_for(run))


def test_partition_before_cluster_says_what_to_run(tmp_path):
    run, _ = make_data(tmp_path, n=10)
    with pytest.raises(FileNotFoundError, match="run the cluster stage first"):
        partition_stage.run(cfg_for(run))


def test_data_in_another_order_than_the_assignments_is_refused(tmp_path):
    """Partition reads data/ by position: data/ rewritten in another order (an older manifest, no keys_sha256) must
    stop it, naming the first sample out of place, before any partition is written."""
    run, keys = make_data(tmp_path, n=40, shard_size=10)
    cluster_stage.run(cfg_for(run, cluster__k=2))
    samples = list(iter_samples(shard_paths(run.data), decode=False))
    for path in run.data.glob("shard-*.tar"):
        path.unlink()
    with ShardSetWriter(run.data, 10, image_size=4, channels=3, num_classes=5, class_names=list("abcde")) as writer:
        for s in reversed(samples):
            writer.write(s["key"], None, s["label"], s.get("caption"), s["encoded"])
    with pytest.raises(ValueError, match=f"data sample 0 is '{keys[-1]}' but the assignments expect '{keys[0]}'"):
        partition_stage.run(cfg_for(run, cluster__k=2))
    assert not (run.partitions / "manifest.json").exists() and not list(run.partitions.glob("cluster-*/manifest.json"))
