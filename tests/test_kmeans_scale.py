"""k-means at scale: memory-mapped float16 or float32 shards, training on a seeded sample, assignment in blocks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ddm.cluster import kmeans, load_assignments
from ddm.cluster.rows import Rows
from ddm.errors import BadInput
from ddm.stages import cluster as cluster_stage
from tests.fabricate import cluster_cfg
from tests.test_cluster import BLOBS, N, blobs, make_run


def memmapped(folder, x: np.ndarray, sizes: list[int]) -> Rows:
    """``x`` saved as one .npy per block of ``sizes`` rows, read back memory-mapped, as the cluster stage does."""
    blocks, start = [], 0
    for i, size in enumerate(sizes):
        np.save(folder / f"emb-{i:06d}.npy", x[start : start + size])
        blocks.append(np.load(folder / f"emb-{i:06d}.npy", mmap_mode="r"))
        start += size
    return Rows(blocks)


def test_rows_read_across_blocks_as_one_float32_matrix(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float16)
    rows = memmapped(tmp_path, x, [30, 0, 45, 25])
    assert len(rows) == 100 and rows.shape == (100, 5)
    for a, b in [(0, 100), (10, 20), (25, 80), (30, 75), (99, 130), (60, 60)]:
        got = rows[a:b]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x[a:b].astype(np.float32))
    chosen = np.array([0, 29, 30, 74, 75, 99])
    np.testing.assert_array_equal(rows.take(chosen), x[chosen].astype(np.float32))
    with pytest.raises(TypeError, match="take"):
        rows[::2]


def test_a_sample_is_seeded_sorted_and_null_means_every_row(tmp_path):
    x = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    rows = memmapped(tmp_path, x, [400, 600])
    a, b, other = rows.sample(50, seed=1), rows.sample(50, seed=1), rows.sample(50, seed=2)
    np.testing.assert_array_equal(a, b)
    picked = a[:, 0].astype(int) // 3
    assert len(set(picked)) == 50 and (np.diff(picked) > 0).all()  # distinct rows, in row order
    assert set(picked) != set(other[:, 0].astype(int) // 3)
    np.testing.assert_array_equal(rows.sample(None, seed=1), x)
    np.testing.assert_array_equal(rows.sample(5000, seed=1), x)


def test_assignment_memory_stays_a_block_not_the_float32_matrix(tmp_path, monkeypatch):
    n, dim, chunk = 200_000, 64, 4096
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float16)
    rows = memmapped(tmp_path, x, [30_000] * 6 + [20_000])
    del x
    full_float32 = n * dim * 4  # 51.2 MB
    monkeypatch.setattr(kmeans, "CHUNK", chunk)
    read = []
    real_getitem = Rows.__getitem__
    monkeypatch.setattr(Rows, "__getitem__", lambda self, s: read.append(s.stop - s.start) or real_getitem(self, s))

    tracemalloc.start()
    try:
        train = rows.sample(8192, seed=0)
        result = kmeans.two_stage_kmeans(rows, 4, fine_k=64, niter=3, seed=0, train=train)
        del train
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.labels) == n and result.fine_centroids.shape == (64, dim)
    assert max(read) <= chunk and sum(read) >= 2 * n  # every row read, a block at a time (assignment, inertia)
    # the sample (2 MB), one block and the int32 labels; reading the matrix whole would be 51.2 MB
    assert peak < full_float32 / 4, f"peak {peak / 1e6:.1f} MB"

    tracemalloc.start()  # the control: the measure does see a whole float32 copy
    try:
        whole = real_getitem(rows, slice(0, n))
        assert tracemalloc.get_traced_memory()[1] >= full_float32
    finally:
        tracemalloc.stop()
    del whole


@pytest.mark.parametrize("method", ["two_stage", "flat"])
@pytest.mark.parametrize("train_sample", [None, 120])
def test_float16_embeddings_give_the_float32_clustering(tmp_path, method, train_sample):
    x, truth = blobs()
    labels = {}
    for dtype in (np.float32, np.float16):
        run, _ = make_run(tmp_path / np.dtype(dtype).name, embeddings=x.astype(dtype))
        cfg = cluster_cfg(run, method, cluster__k=BLOBS, cluster__fine_k=40, cluster__train_sample=train_sample)
        report = cluster_stage.run(cfg)
        assert report["train_sample"] == train_sample and report["faiss_gpus"] == 0
        labels[dtype] = load_assignments(run.assignments).cluster
    np.testing.assert_array_equal(labels[np.float16], labels[np.float32])
    assert adjusted_rand_score(truth, labels[np.float16]) == 1.0


def test_k_means_learns_on_the_sample_and_assigns_every_row(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path / "run")
    seen = []
    real = kmeans.train_kmeans
    monkeypatch.setattr(kmeans, "train_kmeans", lambda x, k, **kw: seen.append((len(x), k)) or real(x, k, **kw))
    report = cluster_stage.run(
        cluster_cfg(run, "two_stage", cluster__k=BLOBS, cluster__fine_k=40, cluster__train_sample=100)
    )
    assert seen[0] == (100, 40)  # the fine centroids, from the sample
    assert seen[1] == (40, BLOBS)  # the coarse ones, from the fine centroids weighted by all N rows
    assert sum(report["sizes"]) == N and len(load_assignments(run.assignments).cluster) == N


def test_a_sample_is_the_same_clustering_for_the_seed(tmp_path):
    x = np.random.default_rng(5).normal(size=(N, 8)).astype(np.float32)  # no clear clusters: the sample matters
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = {}
    for name, sample, seed in [("a", 80, 0), ("b", 80, 0), ("c", 80, 3), ("all", None, 0), ("more", 10 * N, 0)]:
        run, _ = make_run(tmp_path / name, embeddings=x)
        cfg = cluster_cfg(run, "flat", cluster__k=3, cluster__train_sample=sample, cluster__seed=seed)
        ids[name] = cluster_stage.run(cfg)["clustering_id"]
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["all"]  # 80 of 200 rows give other centroids than all of them
    assert ids["more"] == ids["all"]  # a sample of at least N rows is every row
    assert len(set(ids.values())) >= 3


def test_a_sample_smaller_than_the_centroids_is_refused_naming_it(tmp_path):
    run, _ = make_run(tmp_path)
    with pytest.raises(BadInput, match=r"cluster\.train_sample=10 is fewer rows than the 40 centroids"):
        cluster_stage.run(cluster_cfg(run, "two_stage", cluster__k=BLOBS, cluster__fine_k=40, cluster__train_sample=10))


def test_train_sample_is_part_of_what_the_clustering_was_made_with(tmp_path):
    run, _ = make_run(tmp_path)
    cluster_stage.run(cluster_cfg(run, "flat", cluster__k=BLOBS))
    with pytest.raises(BadInput, match=r"cluster\.train_sample None there, 100 now"):
        cluster_stage.run(cluster_cfg(run, "flat", cluster__k=BLOBS, cluster__train_sample=100))
