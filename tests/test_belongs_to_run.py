"""Every artefact a stage reads must be whole and belong to this run, or be refused naming the file and its remedy.

Tiny runs built from real shards on disk and the real stages: whole artefacts copied from another
run (or left from an earlier clustering, embedding or preparation) and damaged files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ddm.artifacts import RunDir
from ddm.data.shards import ShardSetWriter, verify
from ddm.errors import BadInput
from ddm.io import sha256_strings
from ddm.stages import cluster, embed, encode, partition, train_expert, train_router
from tests.fabricate import cluster_image, make_partitions
from tests.test_latent_vae import save_tiny_vae

N = 80


def make_data(root, seed: int = 0) -> RunDir:
    """data/ as `ddm prepare` leaves it: 80 8x8 grey images in 4 shards; another seed, other images, same keys."""
    rd = RunDir(root)
    rng = np.random.default_rng(seed)
    keys = [f"syn-train-{i:06d}" for i in range(N)]
    with ShardSetWriter(
        rd.data,
        20,
        source="syn",
        split="train",
        image_size=8,
        channels=1,
        num_classes=3,
        class_names=None,
        keys_sha256=sha256_strings(keys),
    ) as writer:
        for i, key in enumerate(keys):
            writer.write(key, cluster_image(i % 4, rng), i % 3)
    return rd


def stages_cfg(fast_cfg, rd: RunDir, *more):
    return fast_cfg("cluster.k=2", "cluster.min_shards_per_partition=2", *more, run_dir=rd.root)


def no_training(monkeypatch) -> list:
    """Training steps taken (none may be, when an input is refused)."""
    steps = []

    def step(self, batch, idx):
        steps.append(idx)
        raise AssertionError("trained on inputs that should have been refused")

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", step)
    return steps


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- partitions and latents belong to the run's clustering and VAE --------------------------------------------------


def test_whole_shards_of_another_runs_partition_are_refused_before_training(fast_cfg, tmp_path, monkeypatch):
    ours = make_data(tmp_path / "ours")
    cfg = stages_cfg(fast_cfg, ours, "cluster=random", "expert.steps=2")
    cluster.run(cfg)
    partition.run(cfg)
    theirs = RunDir(tmp_path / "theirs")  # the same data, clustered with another seed: another clustering
    shutil.copytree(ours.data, theirs.data)
    other = stages_cfg(fast_cfg, theirs, "cluster=random", "cluster.seed=1")
    cluster.run(other)
    partition.run(other)
    shutil.rmtree(ours.partition(0))
    shutil.copytree(theirs.partition(0), ours.partition(0))  # whole: every checksum matches its manifest
    verify(ours.partition(0))

    steps = no_training(monkeypatch)
    with pytest.raises(
        BadInput,
        match=r"cluster-00/manifest.json belongs to clustering \w+, but cluster 0 of this run "
        r"\(.*clusters/report.json\) is clustering \w+.*ddm partition redo=true",
    ):
        train_expert.run(cfg)
    assert steps == [] and not ours.expert(0).exists()


@pytest.fixture(scope="module")
def two_vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    save_tiny_vae(root / "a", in_channels=3, scaling_factor=0.5)
    save_tiny_vae(root / "b", in_channels=3, scaling_factor=0.25)  # latents scaled otherwise: another VAE
    return root / "a", root / "b"


def test_latents_of_another_vae_are_refused_before_training(fast_cfg, tmp_path, monkeypatch, two_vaes):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    a, b = two_vaes
    encode.run(fast_cfg("vae=sd", f"vae.pretrained={a}"))
    steps = no_training(monkeypatch)
    with pytest.raises(BadInput, match=r"latents/cluster-00 holds latents of another VAE.*ddm encode redo=true"):
        train_expert.run(fast_cfg("vae=sd", f"vae.pretrained={b}", "expert.steps=2"))
    assert steps == [] and not rd.expert(0).exists()


def test_encode_refuses_a_partition_of_another_clustering(fast_cfg, tmp_path, two_vaes):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    other = make_partitions(tmp_path / "other", sizes=(40, 40), clustering_id="bad5eed")
    shutil.rmtree(rd.partition(1))
    shutil.copytree(other.partition(1), rd.partition(1))
    with pytest.raises(BadInput, match=r"cluster-01/manifest.json belongs to clustering bad5eed.*c0ffee"):
        encode.run(fast_cfg("vae=sd", f"vae.pretrained={two_vaes[0]}"))
    assert not rd.latent(1).exists()


# -- embeddings belong to the data, a clustering to the embeddings, partitions to the data -------------------------


def test_embeddings_of_the_same_keys_with_other_images_are_refused(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd)
    embed.run(cfg)
    make_data(rd.root, seed=1)  # prepared again: the same keys, other images
    with pytest.raises(
        BadInput,
        match=r"embeddings in .*embeddings/manifest.json were computed from other data "
        r"shards.*rerun embed with redo=true",
    ):
        cluster.run(cfg)
    assert not rd.cluster_report.exists()


def test_partition_refuses_a_clustering_of_other_embeddings(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd)
    embed.run(cfg)
    cluster.run(cfg)
    embed.run(stages_cfg(fast_cfg, rd, "redo=true", "embed.dim=8"))  # embedded again, otherwise
    with pytest.raises(
        BadInput,
        match=r"clusters/report.json was computed from embeddings \w+, but .*embeddings/"
        r"manifest.json is now embeddings \w+.*ddm cluster redo=true",
    ):
        partition.run(cfg)
    assert not rd.partitions_index.exists()


def test_partitions_of_data_prepared_again_are_not_kept(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd)
    for stage in (embed, cluster, partition):
        stage.run(cfg)
    make_data(rd.root, seed=1)  # the same keys, other images: the partitions hold the old ones
    with pytest.raises(BadInput, match="other data shards.*rerun embed with redo=true"):
        partition.run(cfg)  # not "done already": its inputs are checked, and the old embeddings refused
    redo = stages_cfg(fast_cfg, rd, "redo=true")
    embed.run(redo)
    cluster.run(redo)
    partition.run(cfg)
    for k in (0, 1):  # copied from the data as it is now
        assert verify(rd.partition(k))["data_shards_sha256"] == sha256_strings(
            s["sha256"] for s in verify(rd.data)["shards"]
        )


def test_a_damaged_data_shard_is_refused_before_it_is_copied_into_a_partition(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd, "cluster=random")
    cluster.run(cfg)
    flip_a_byte(rd.data / "shard-000002.tar")  # a partition's checksums would be computed from these bytes
    with pytest.raises(BadInput, match=r"data/shard-000002.tar does not match the checksum.*ddm prepare redo=true"):
        partition.run(cfg)
    assert not rd.partitions_index.exists() and not rd.partition(0).exists()


# -- damaged files end in BadInput naming the file and how to remake it --------------------------------------------


def test_damaged_embeddings_are_refused_naming_the_file(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd)
    embed.run(cfg)
    emb = rd.embeddings / "emb-000001.npy"
    whole = emb.read_bytes()
    emb.write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(BadInput, match=r"embeddings/emb-000001.npy .*embed with redo=true"):
        cluster.run(cfg)
    emb.write_bytes(whole)
    flip_a_byte(emb)  # same size, other numbers: only its checksum tells
    with pytest.raises(BadInput, match=r"embeddings/emb-000001.npy does not match the checksum"):
        cluster.run(cfg)
    assert not rd.cluster_report.exists()


def test_a_truncated_npy_without_a_recorded_checksum_names_itself(tmp_path):
    from tests.test_cluster import cfg_for, make_run

    run, _ = make_run(tmp_path)  # embeddings written by hand: no checksums in the manifest
    emb = run.embeddings / "emb-000000.npy"
    emb.write_bytes(emb.read_bytes()[:100])
    with pytest.raises(BadInput, match=r"embeddings/emb-000000.npy is damaged .*ddm embed redo=true"):
        cluster.run(cfg_for(run, "flat"))


@pytest.mark.parametrize("text", ['{"num_samples": 40, "shar', "[]", "\xff\xfe garbage"])
def test_a_damaged_partition_manifest_is_refused_naming_it(fast_cfg, tmp_path, monkeypatch, text):
    rd = make_partitions(tmp_path / "run")
    rd.partition_manifest(0).write_bytes(text.encode("latin-1"))
    steps = no_training(monkeypatch)
    with pytest.raises(BadInput, match=r"partitions/cluster-00/manifest.json is .*ddm partition redo=true"):
        train_expert.run(fast_cfg("expert.steps=2"))
    assert steps == []


def test_a_damaged_clustering_is_refused_naming_the_file(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd, "cluster=random")
    cluster.run(cfg)
    report = rd.cluster_report.read_text()
    rd.cluster_report.write_text(report[: len(report) // 2])
    with pytest.raises(BadInput, match=r"clusters/report.json is damaged .*ddm cluster redo=true"):
        partition.run(cfg)
    rd.cluster_report.write_text(report)
    rd.assignments.write_bytes(rd.assignments.read_bytes()[:200])
    with pytest.raises(BadInput, match=r"clusters/assignments.npz is damaged .*ddm cluster redo=true"):
        partition.run(cfg)
    assert not rd.partitions_index.exists()


def test_a_data_shard_that_is_not_a_tar_is_refused_naming_it(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    (rd.data / "shard-000001.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BadInput, match=r"data/shard-000001.tar is not a readable tar shard.*ddm prepare redo=true"):
        cluster.run(stages_cfg(fast_cfg, rd, "cluster=random"))  # the random baseline reads the keys alone


def test_the_partition_index_names_the_data_it_was_copied_from(fast_cfg, tmp_path):
    rd = make_data(tmp_path / "run")
    cfg = stages_cfg(fast_cfg, rd, "cluster=random")
    cluster.run(cfg)
    index = partition.run(cfg)
    data = verify(rd.data)
    digest = sha256_strings(s["sha256"] for s in data["shards"])
    assert index["data_shards_sha256"] == digest and index["data_num_shards"] == 4
    assert all(verify(rd.partition(k))["data_shards_sha256"] == digest for k in (0, 1))
    assert (rd.partitions / "verified.json").exists()  # what it checked of data/, kept in its own folder


# -- the router and distillation read every partition: the same checks, in their own folders ------------------------


def test_the_router_refuses_partitions_copied_from_another_run(fast_cfg, tmp_path, monkeypatch):
    ours = make_data(tmp_path / "ours")
    cfg = stages_cfg(fast_cfg, ours, "cluster=random", "router.steps=2")
    cluster.run(cfg)
    partition.run(cfg)
    theirs = RunDir(tmp_path / "theirs")
    shutil.copytree(ours.data, theirs.data)
    other = stages_cfg(fast_cfg, theirs, "cluster=random", "cluster.seed=1")
    cluster.run(other)
    partition.run(other)
    shutil.rmtree(ours.partitions)
    shutil.copytree(theirs.partitions, ours.partitions)  # whole, with their index: consistent among themselves

    def step(self, batch, idx):
        raise AssertionError("trained on partitions of another run")

    monkeypatch.setattr(train_router.RouterModule, "training_step", step)
    with pytest.raises(
        BadInput, match=r"cluster-00/manifest.json belongs to clustering \w+, but cluster 0 of this run"
    ):
        train_router.run(cfg)
    assert not ours.router_record.exists()


def test_the_router_checks_its_shards_once_and_refuses_a_damaged_one(fast_cfg, tmp_path, monkeypatch):
    from tests.test_verify_once import count_hashes

    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    cfg = fast_cfg("router.steps=2", "router.eval_samples=20")

    def stop(self, batch, idx):
        raise KeyboardInterrupt  # as a preemption would, before any step is saved

    monkeypatch.setattr(train_router.RouterModule, "training_step", stop)
    hashed = count_hashes(monkeypatch)
    for _ in range(2):
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            train_router.run(cfg)
    shards = sorted(rd.partitions.glob("cluster-*/*.tar"))
    assert sorted(hashed) == shards  # every shard of every partition once, over two starts
    flip_a_byte(shards[-1])
    with pytest.raises(BadInput, match=rf"{shards[-1].name}.*checksum"):
        train_router.run(cfg)
    assert sorted(hashed) == sorted([*shards, shards[-1]])
