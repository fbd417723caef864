"""The cluster stage and its k-means functions, on small synthetic runs built here (no embed stage needed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ddm.artifacts import RunDir
from ddm.cluster import clustering_id, load_assignments
from ddm.cluster.kmeans import EmptyClusterError, flat_kmeans, random_partition, renumber_by_size, two_stage_kmeans
from ddm.data.shards import ShardSetWriter, load_manifest
from ddm.errors import BadInput
from ddm.io import read_json, sha256_strings, write_json
from ddm.stages import cluster as cluster_stage
from tests.fabricate import cluster_cfg

N, BLOBS, DIM, SHARD = 200, 4, 8, 30


def blobs(n=N, k=BLOBS, dim=DIM, seed=0):
    """Unit-normalised points around k well-separated directions; returns (x, blob id)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim, dtype=np.float32)[:k] * 3 + rng.normal(0, 0.1, (k, dim)).astype(np.float32)
    truth = rng.permutation(np.arange(n) % k)
    x = centers[truth] + rng.normal(0, 0.05, (n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def make_run(root, n=N, embeddings=None, encoder="toy-encoder"):
    """data/ shards (+ embeddings/ aligned with them unless embeddings is False); returns (RunDir, keys)."""
    run = RunDir(root)
    rng = np.random.default_rng(1)
    keys = [f"toy-train-{i:06d}" for i in range(n)]
    with ShardSetWriter(
        run.data,
        SHARD,
        image_size=4,
        channels=1,
        num_classes=3,
        class_names=["a", "b", "c"],
        keys_sha256=sha256_strings(keys),
    ) as writer:
        for key in keys:
            writer.write(key, rng.integers(0, 256, (4, 4), dtype=np.uint8), int(rng.integers(0, 3)))
    if embeddings is not False:
        x = blobs(n)[0] if embeddings is None else embeddings
        write_embeddings(run, keys, x, [s["num_samples"] for s in writer.manifest["shards"]], encoder)
    return run, keys


def write_embeddings(run, keys, x, shard_sizes, encoder="toy-encoder", keys_sha256=None):
    run.embeddings.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for i, size in enumerate(shard_sizes):
        np.save(run.embeddings / f"emb-{i:06d}.npy", x[start : start + size])
        (run.embeddings / f"keys-{i:06d}.txt").write_text("\n".join(keys[start : start + size]) + "\n")
        shards.append(dict(embeddings=f"emb-{i:06d}.npy", keys=f"keys-{i:06d}.txt", num_samples=size))
        start += size
    write_json(
        run.embeddings_manifest,
        dict(
            encoder=encoder,
            dim=x.shape[1],
            num_samples=len(keys),
            keys_sha256=keys_sha256 or sha256_strings(keys),
            shards=shards,
        ),
    )


def cfg_for(run, method="two_stage", **overrides):
    return cluster_cfg(run, method, **overrides)


# -- the algorithms ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flat", "two_stage"])
def test_kmeans_recovers_separated_blobs(tmp_path, method):
    run, _ = make_run(tmp_path)
    report = cluster_stage.run(cfg_for(run, method, cluster__k=BLOBS))
    truth = blobs()[1]
    labels = load_assignments(run.assignments).cluster
    assert adjusted_rand_score(truth, labels) == 1.0
    assert report["sizes"] == [N // BLOBS] * BLOBS
    np.testing.assert_array_equal(np.load(run.clusters / "centroids.npy").shape, (BLOBS, DIM))


@pytest.mark.parametrize("method", [flat_kmeans, two_stage_kmeans])
def test_blobs_recovered_for_every_seed(method):
    # A random start misses a blob for about a third of seeds here; k-means++ must not.
    x, truth = blobs()
    for seed in range(10):
        assert adjusted_rand_score(truth, method(x, BLOBS, niter=20, seed=seed).labels) == 1.0, seed


def test_spherical_kmeans_keeps_unit_centroids():
    x, truth = blobs()
    result = two_stage_kmeans(x, BLOBS, fine_k=40, niter=10, seed=0, spherical=True)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    np.testing.assert_allclose(np.linalg.norm(result.fine_centroids, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-4)


def test_two_stage_samples_follow_their_nearest_fine_centroid():
    # Unclustered data, so joining the nearest *coarse* centroid would differ at the boundaries.
    x = np.random.default_rng(0).normal(size=(600, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    result = two_stage_kmeans(x, 3, fine_k=32, niter=10, seed=0)
    d2 = ((x[:, None, :] - result.fine_centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(result.labels, result.fine_to_coarse[d2.argmin(1)])
    assert result.fine_centroids.shape == (32, DIM) and result.centroids.shape == (3, DIM)
    assert result.fine_inertia <= result.inertia


def test_two_stage_caps_fine_k_and_logs_it(tmp_path, caplog):
    run, _ = make_run(tmp_path)
    logger = logging.getLogger("ddm")
    logger.addHandler(caplog.handler)  # the CLI may have turned propagation off
    try:
        with caplog.at_level(logging.INFO, logger="ddm"):
            report = cluster_stage.run(cfg_for(run, "two_stage", cluster__k=BLOBS, cluster__fine_k=1024))
    finally:
        logger.removeHandler(caplog.handler)
    assert report["fine_k"] == N // 4
    assert np.load(run.clusters / "fine_centroids.npy").shape == (N // 4, DIM)
    assert np.load(run.clusters / "fine_to_coarse.npy").shape == (N // 4,)
    assert any("fine_k=1024 reduced to 50" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("cluster: two_stage K=4 sizes=") for r in caplog.records)


def test_renumbering_orders_by_size_then_first_member():
    labels = np.array([2, 2, 0, 1, 1, 1, 0])
    new, order = renumber_by_size(labels, 3)
    # sizes: old 1 has 3; old 2 and old 0 have 2 each, old 2 appears first.
    np.testing.assert_array_equal(order, [1, 2, 0])
    np.testing.assert_array_equal(new, [1, 1, 2, 0, 0, 0, 2])


def test_renumbering_makes_ids_independent_of_kmeans_order():
    x, truth = blobs(n=203)  # unequal blob sizes: 51, 51, 51, 50
    a = flat_kmeans(x, BLOBS, niter=10, seed=0).labels
    b = flat_kmeans(x[::-1].copy(), BLOBS, niter=10, seed=5).labels[::-1]
    assert adjusted_rand_score(a, b) == 1.0
    sizes = np.bincount(a)
    assert list(sizes) == sorted(sizes, reverse=True)


def test_random_partition_sizes_within_one():
    for n, k in [(10, 3), (101, 4), (7, 7), (5, 1)]:
        sizes = np.bincount(random_partition(n, k, seed=3).labels, minlength=k)
        assert sizes.sum() == n and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("method", ["flat", "two_stage"])
def test_degenerate_data_leaves_an_empty_cluster(method):
    x = np.tile(np.array([[1.0, 0, 0, 0]], dtype=np.float32), (40, 1))
    x[:20] = [0, 1, 0, 0]  # two distinct points, three clusters asked
    run = flat_kmeans if method == "flat" else two_stage_kmeans
    with pytest.raises(EmptyClusterError, match=r"empty.*smaller cluster.k or another cluster.seed"):
        run(x, 3, niter=5, seed=0)


# -- the stage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flat", "two_stage", "random"])
def test_same_seed_same_clustering(tmp_path, method):
    a, _ = make_run(tmp_path / "a")
    b, _ = make_run(tmp_path / "b")
    ra = cluster_stage.run(cfg_for(a, method, cluster__k=3))
    rb = cluster_stage.run(cfg_for(b, method, cluster__k=3))
    np.testing.assert_array_equal(load_assignments(a.assignments).cluster, load_assignments(b.assignments).cluster)
    assert ra["clustering_id"] == rb["clustering_id"]


def test_random_seed_changes_the_partition(tmp_path):
    a, _ = make_run(tmp_path / "a", embeddings=False)
    b, _ = make_run(tmp_path / "b", embeddings=False)
    ra = cluster_stage.run(cfg_for(a, "random", seed=0))
    rb = cluster_stage.run(cfg_for(b, "random", seed=1))
    assert ra["clustering_id"] != rb["clustering_id"]
    assert (load_assignments(a.assignments).cluster != load_assignments(b.assignments).cluster).any()


@pytest.mark.parametrize("method", ["flat", "two_stage", "random"])
def test_every_sample_assigned_exactly_once(tmp_path, method):
    run, keys = make_run(tmp_path)
    report = cluster_stage.run(cfg_for(run, method, cluster__k=3))
    a = load_assignments(run.assignments)
    assert a.keys.tolist() == keys  # dataset order, each key once
    assert a.cluster.dtype == np.int32 and set(a.cluster.tolist()) == {0, 1, 2}
    assert report["sizes"] == a.sizes and sum(report["sizes"]) == N == report["num_samples"]
    assert report["sizes"] == sorted(report["sizes"], reverse=True)
    assert report["clustering_id"] == clustering_id(keys, a.cluster) == a.clustering_id
    assert report["keys_sha256"] == load_manifest(run.data)["keys_sha256"]


def test_report_records_inertia_and_encoder(tmp_path):
    run, _ = make_run(tmp_path, encoder="dinov2-toy")
    report = cluster_stage.run(cfg_for(run, "two_stage", cluster__k=BLOBS))
    assert read_json(run.cluster_report) == report
    assert report["encoder"] == "dinov2-toy" and report["method"] == "two_stage" and report["seed"] == 0
    # Tight blobs: both levels are small, and the coarse level cannot beat the fine one.
    assert 0 <= report["fine_inertia"] <= report["inertia"] < 0.05
    assert len(report["clustering_id"]) == 16


def test_random_needs_no_embeddings(tmp_path):
    run, keys = make_run(tmp_path, n=103, embeddings=False)
    report = cluster_stage.run(cfg_for(run, "random", cluster__k=4))
    assert not run.embeddings.exists() and not (run.clusters / "centroids.npy").exists()
    assert max(report["sizes"]) - min(report["sizes"]) <= 1 and sum(report["sizes"]) == 103
    assert report["encoder"] is None and report["inertia"] is None
    assert load_assignments(run.assignments).keys.tolist() == keys


@pytest.mark.parametrize("k", [0, N + 1])
@pytest.mark.parametrize("method", ["flat", "two_stage", "random"])
def test_bad_k_names_the_option(tmp_path, method, k):
    run, _ = make_run(tmp_path)
    with pytest.raises(ValueError, match=rf"cluster\.k={k}"):
        cluster_stage.run(cfg_for(run, method, cluster__k=k))
    if k:
        with pytest.raises(ValueError, match=rf"N={N}"):
            cluster_stage.run(cfg_for(run, method, cluster__k=k))
    assert not run.cluster_report.exists()


def test_empty_cluster_error_from_the_stage(tmp_path):
    x = np.zeros((N, DIM), dtype=np.float32)
    x[:, 0] = 1  # every embedding identical
    run, _ = make_run(tmp_path, embeddings=x)
    with pytest.raises(EmptyClusterError, match=r"cluster\(s\) \[1, 2\]"):
        cluster_stage.run(cfg_for(run, "flat", cluster__k=3))
    assert not run.cluster_report.exists()


def test_embeddings_of_other_data_are_refused(tmp_path):
    run, keys = make_run(tmp_path, embeddings=False)
    write_embeddings(run, keys, blobs()[0], [N], keys_sha256="0" * 64)
    with pytest.raises(ValueError, match="rerun embed with redo=true"):
        cluster_stage.run(cfg_for(run, "flat"))


def test_keys_files_disagreeing_with_their_manifest_are_refused(tmp_path):
    run, keys = make_run(tmp_path)
    (run.embeddings / "keys-000000.txt").write_text("\n".join(reversed(keys[:SHARD])) + "\n")
    with pytest.raises(ValueError, match="rerun embed with redo=true"):
        cluster_stage.run(cfg_for(run, "flat"))


def test_skip_unless_redo(tmp_path):
    run, _ = make_run(tmp_path)
    first = cluster_stage.run(cfg_for(run, "flat"))
    (run.clusters / "centroids.npy").unlink()
    assert cluster_stage.run(cfg_for(run, "flat")) == first  # done with these settings: skipped
    with pytest.raises(BadInput, match=r"was made with other settings \(cluster\.k \d+ there, 2 now\).*redo=true"):
        cluster_stage.run(cfg_for(run, "flat", cluster__k=2))  # other settings: refused, not taken for done
    assert not (run.clusters / "centroids.npy").exists()
    again = cluster_stage.run(cfg_for(run, "flat", redo=True))
    assert (run.clusters / "centroids.npy").exists() and again["clustering_id"] == first["clustering_id"]


def test_redo_with_another_method_removes_stale_outputs(tmp_path):
    run, _ = make_run(tmp_path)
    cluster_stage.run(cfg_for(run, "two_stage"))
    assert (run.clusters / "fine_to_coarse.npy").exists()
    report = cluster_stage.run(cfg_for(run, "random", redo=True))
    assert report["method"] == "random"
    assert not any((run.clusters / f).exists() for f in ("centroids.npy", "fine_centroids.npy", "fine_to_coarse.npy"))


def test_unknown_method(tmp_path):
    run, _ = make_run(tmp_path)
    with pytest.raises(ValueError, match="cluster.method='spectral'"):
        cluster_stage.run(cfg_for(run, "flat", cluster__method="spectral"))


@pytest.mark.parametrize("option", ["two_stage", "flat", "random"])
def test_cluster_configs_compose_with_the_root_config(make_cfg, option):
    cfg = make_cfg(f"cluster={option}", "seed=7")
    assert cfg.cluster.method == option and cfg.cluster.seed == 7
    assert set(cfg.cluster.to_dict()) == {
        "method",
        "k",
        "fine_k",
        "niter",
        "seed",
        "spherical",
        "train_sample",
        "min_shards_per_partition",
        "partition_shard_size",
        "partition_parts",
        "partition_part",
    }
