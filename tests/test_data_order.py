"""Class-sorted data must reach training mixed: prepare and partition store samples in seeded random orders,
and the router's held-out and training shards are drawn at random."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.data.router_data import split_shards
from ddm.data.shards import ShardSetWriter, iter_samples, load_manifest, shard_paths
from ddm.data.sources import named_key
from ddm.errors import BadInput
from ddm.io import sha256_strings
from ddm.stages import cluster as cluster_stage
from ddm.stages import partition as partition_stage
from ddm.stages import prepare
from ddm.stages.train_expert import _job as expert_job
from tests.fabricate import cluster_cfg

# Unequal classes, each several times the loader's shuffle buffer (as an ImageNet class is to a 2000-sample buffer).
CLASS_SIZES = (40, 70, 50, 80, 60)
BUFFER = 20
BATCH = 16
BATCHES = 8
# Total variation between a batch's class histogram and the data's class frequencies, averaged over the first
# BATCHES batches. Batches of 16 drawn iid from these classes give 0.20 on average (0.26 in 99 of 100 draws of
# 8 batches); a class-sorted stream read through a 20-sample buffer fills a batch with one or two classes: 0.55+.
MAX_MEAN_TV = 0.35


def class_sorted_folder(root: Path, sizes=CLASS_SIZES) -> Path:
    """One folder per class, files named so that sorting them lists class 0 first, then class 1, ..."""
    rng = np.random.default_rng(0)
    for label, n in enumerate(sizes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def class_sorted_shards(folder: Path, sizes=CLASS_SIZES) -> str:
    """Existing webdataset shards as a user may bring them: one class per shard, in class order (a url list)."""
    rng = np.random.default_rng(1)
    urls = []
    for label, n in enumerate(sizes):
        with ShardSetWriter(folder / f"class{label}", shard_size=n) as w:
            for i in range(n):
                w.write(f"orig_{label}_{i:04d}", rng.integers(0, 256, (8, 8), dtype=np.uint8), label)
        urls.append(str(folder / f"class{label}" / "shard-000000.tar"))
    return "[" + ",".join(urls) + "]"


def one_cluster_cfg(make_cfg, *data, run_dir=None, seed=0):
    """prepare -> cluster (one random cluster, so the partition holds all data) -> partition, in shards of 50."""
    return make_cfg(
        *data,
        "data.image_size=8",
        "data.channels=1",
        "data.shard_size=50",
        "cluster=random",
        "cluster.k=1",
        "cluster.min_shards_per_partition=6",
        "cluster.partition_shard_size=50",
        f"expert.shuffle_buffer={BUFFER}",
        "island.num_workers=0",
        f"seed={seed}",
        run_dir=run_dir,
    )


def prepare_and_partition(cfg) -> RunDir:
    for stage in (prepare, cluster_stage, partition_stage):
        stage.run(cfg)
    return RunDir(cfg.run_dir)


def mean_batch_tv(cfg, rd: RunDir) -> float:
    """Expert 0's first batches, read as its job reads them: mean total variation of their classes from the data's."""
    manifest = load_manifest(rd.partition(0))
    loader = expert_job(cfg, rd, 0, manifest).build_loader(BATCH, 0)
    expected = np.array(CLASS_SIZES) / sum(CLASS_SIZES)
    tvs = []
    for _, y in loader:
        seen = np.bincount(y.numpy(), minlength=len(CLASS_SIZES)) / len(y)
        tvs.append(0.5 * float(np.abs(seen - expected).sum()))
        if len(tvs) == BATCHES:
            return float(np.mean(tvs))
    raise AssertionError("the loader ended")  # it resamples shards forever


def stored_keys(folder: Path) -> list[str]:
    return [s["key"] for s in iter_samples(shard_paths(folder), decode=False)]


# ------------------------------------------------------------------ batches through the expert's loader


def test_a_class_sorted_image_folder_reaches_training_mixed(make_cfg, tmp_path):
    root = class_sorted_folder(tmp_path / "imgs")
    cfg = one_cluster_cfg(make_cfg, "data=image_folder", f"data.root={root}")
    rd = prepare_and_partition(cfg)
    tv = mean_batch_tv(cfg, rd)
    print(f"image folder: mean total variation of the first {BATCHES} batches' classes = {tv:.3f}")
    assert tv < MAX_MEAN_TV


def test_class_sorted_input_shards_reach_training_mixed(make_cfg, tmp_path):
    """prepare can only shuffle the order of streamed input shards; partition must mix the samples themselves."""
    urls = class_sorted_shards(tmp_path / "in")
    cfg = one_cluster_cfg(make_cfg, "data=webdataset", f"data.urls={urls}", f"data.num_classes={len(CLASS_SIZES)}")
    rd = prepare_and_partition(cfg)
    tv = mean_batch_tv(cfg, rd)
    print(f"webdataset input: mean total variation of the first {BATCHES} batches' classes = {tv:.3f}")
    assert tv < MAX_MEAN_TV
    assert load_manifest(rd.data)["order"] == dict(permuted="shards", seed=0)
    assert load_manifest(rd.partition(0))["order"] == dict(permuted="samples", seed=0)


# ------------------------------------------------------------------ prepare: the stored order


def test_prepare_stores_a_seeded_permutation(make_cfg, tmp_path):
    root = class_sorted_folder(tmp_path / "imgs")

    def prepared(name, seed):
        cfg = one_cluster_cfg(make_cfg, "data=image_folder", f"data.root={root}", run_dir=tmp_path / name, seed=seed)
        prepare.run(cfg)
        return load_manifest(RunDir(cfg.run_dir).data), stored_keys(RunDir(cfg.run_dir).data)

    a, keys_a = prepared("a", seed=0)
    again, keys_again = prepared("again", seed=0)
    other, keys_other = prepared("other", seed=1)
    # a key names its file (class0/0000.png ...), whatever the seed
    files = [f"class{label}/{i:04d}.png" for label, n in enumerate(CLASS_SIZES) for i in range(n)]
    listing = sorted(named_key("folder", "train", f) for f in files)
    assert keys_a == keys_again and [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in again["shards"]]
    assert keys_other != keys_a and keys_a != listing  # stored in a seeded order, not the listing's
    assert sorted(keys_a) == sorted(keys_other) == listing  # every image once, whatever the order
    assert a["keys_sha256"] == sha256_strings(keys_a) and other["keys_sha256"] == sha256_strings(keys_other)
    assert a["order"] == dict(permuted="samples", seed=0) and other["order"] == dict(permuted="samples", seed=1)


def test_prepare_shuffles_the_order_of_streamed_input_shards(make_cfg, tmp_path):
    """Samples of one input shard stay together and in order; the shards themselves follow the seed."""
    urls = class_sorted_shards(tmp_path / "in")

    def labels_read(seed):
        cfg = make_cfg(
            "data=webdataset",
            f"data.urls={urls}",
            "data.image_size=8",
            "data.channels=1",
            f"data.num_classes={len(CLASS_SIZES)}",
            f"seed={seed}",
            run_dir=tmp_path / f"seed{seed}",
        )
        prepare.run(cfg)
        return [s["label"] for s in iter_samples(shard_paths(RunDir(cfg.run_dir).data), decode=False)]

    first, again, other = labels_read(0), labels_read(0), labels_read(1)
    runs = [label for i, label in enumerate(first) if i == 0 or first[i - 1] != label]
    assert sorted(runs) == list(range(len(CLASS_SIZES))) and runs != sorted(runs)  # whole shards, permuted
    assert first == again and other != first


# ------------------------------------------------------------------ partition: its own order


def sorted_data(run: RunDir, n=120, classes=4) -> list[str]:
    """data/ sorted by label, as a user's own sorted shards would be."""
    keys = [f"toy-train-{i:06d}" for i in range(n)]
    labels = [i * classes // n for i in range(n)]
    rng = np.random.default_rng(0)
    with ShardSetWriter(
        run.data, 25, image_size=4, channels=1, num_classes=classes, class_names=None, keys_sha256=sha256_strings(keys)
    ) as w:
        for key, label in zip(keys, labels):
            w.write(key, rng.integers(0, 256, (4, 4), dtype=np.uint8), label)
    return keys


def test_partition_order_follows_the_seed_not_the_data(tmp_path):
    def partitioned(name, seed) -> RunDir:
        run = RunDir(tmp_path / name)
        sorted_data(run)
        cfg = cluster_cfg(run, "random", cluster__k=2, cluster__seed=0, seed=seed, cluster__min_shards_per_partition=3)
        cluster_stage.run(cfg)
        partition_stage.run(cfg)
        return run

    runs = dict(a=partitioned("a", 0), again=partitioned("again", 0), other=partitioned("other", 1))
    keys = {name: [stored_keys(run.partition(k)) for k in range(2)] for name, run in runs.items()}
    assert keys["a"] == keys["again"] and keys["a"] != keys["other"]
    for keys_a, keys_other in zip(keys["a"], keys["other"]):
        assert keys_a != sorted(keys_a) and sorted(keys_a) == sorted(keys_other)  # same members, not in data order
    for (name, run), seed in zip(runs.items(), (0, 0, 1)):
        for k in range(2):
            m = load_manifest(run.partition(k))
            assert m["order"] == dict(permuted="samples", seed=seed)
            assert m["keys_sha256"] == sha256_strings(keys[name][k])  # over the stored order


# ------------------------------------------------------------------ the router's shards


SHARDS = [f"shard-{i:06d}.tar" for i in range(10)]
SIZES = [50] * 9 + [20]  # the last shard holds a remainder


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.2])
def test_router_shards_are_drawn_with_the_seed(fraction):
    drawn = [split_shards(SHARDS, SIZES, fraction, seed) for seed in range(20)]
    for train, held in drawn:
        assert len(held) == 1 and held[0] != SHARDS[-1]  # a full shard: the remainder would measure little
        assert not set(train) & set(held)
        assert len(train) == math.ceil(fraction * 9) and train == sorted(train)
    assert drawn == [split_shards(SHARDS, SIZES, fraction, seed) for seed in range(20)]  # reproducible
    assert len({held[0] for _, held in drawn}) > 3 and any(held != SHARDS[:1] for _, held in drawn)
    if fraction < 1:
        assert len({tuple(train) for train, _ in drawn}) > 3
        assert any(train != [s for s in SHARDS if s not in held][: len(train)] for train, held in drawn)


def test_router_shards_of_small_partitions_and_bad_fractions():
    assert split_shards(SHARDS[:1], [7], 0.5, seed=0) == (SHARDS[:1], SHARDS[:1])  # trained and measured on it
    train, held = split_shards(SHARDS[:2], [50, 50], 0.1, seed=3)
    assert len(train) == len(held) == 1 and sorted(train + held) == SHARDS[:2]
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(BadInput, match="router.sample_fraction"):
            split_shards(SHARDS, SIZES, fraction, seed=0)
