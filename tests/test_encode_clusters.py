"""``ddm encode`` per island: one cluster or a list, under the experts' lock, written whole and then put in place."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from ddm.data.shards import MANIFEST, ShardSetWriter, iter_samples, load_manifest, shard_paths, verify
from ddm.errors import BadInput, Locked
from ddm.images import batch_to_model_space
from ddm.io import write_json
from ddm.latent import LatentCodec
from ddm.latent.partition_images import image_batches
from ddm.launch.encode_job import job_folder, partial_folder
from ddm.launch.lock import LOCK_NAME, acquire, release
from ddm.stages import encode
from tests.fabricate import make_partitions
from tests.test_latent_vae import save_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    save_tiny_vae(folder, in_channels=3, scaling_factor=0.5)
    return folder


def run_encode(make_cfg, rd, vae_dir, *more):
    # batches of 16 over shards of 10: most batches span two shards
    return encode.run(make_cfg("vae=sd", f"vae.pretrained={vae_dir}", "vae.batch_size=16", *more, run_dir=rd.root))


def shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_one_cluster_is_encoded_alone_the_same_as_a_full_encode_writes_it(make_cfg, tmp_path, vae_dir):
    one = make_partitions(tmp_path / "one", sizes=(40, 40))
    summary = run_encode(make_cfg, one, vae_dir, "vae.clusters=1", "vae.workers=0")
    assert (summary["clusters"], summary["encoded"]) == ([1], [1])
    assert not one.latent(0).exists() and (one.latent(1) / MANIFEST).exists()

    full = make_partitions(tmp_path / "full", sizes=(40, 40))  # the same partitions, another run folder
    assert run_encode(make_cfg, full, vae_dir, "vae.workers=3")["encoded"] == [0, 1]  # in loader workers
    ours, theirs = load_manifest(one.latent(1)), load_manifest(full.latent(1))
    assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]
    assert shard_bytes(one.latent(1)) == shard_bytes(full.latent(1)) and len(ours["shards"]) == 4

    # and the latents are the VAE's, in the partition's order (in fp32 on the CPU, stored float16)
    partition = load_manifest(one.partition(1))
    images = list(iter_samples(shard_paths(one.partition(1), partition)))
    stored = list(iter_samples(shard_paths(one.latent(1), ours)))
    assert [s["key"] for s in stored] == [s["key"] for s in images]
    want = LatentCodec.load(str(vae_dir)).encode(batch_to_model_space(np.stack([s["image"] for s in images])))
    assert np.array_equal(np.stack([s["latent"] for s in stored]), want.numpy().astype(np.float16))
    assert ours["encode_precision"] == "fp32"

    # a list names clusters too; a cluster already encoded from this partition with this VAE is skipped
    summary = run_encode(make_cfg, one, vae_dir, "vae.clusters=[0,1]")
    assert (summary["encoded"], summary["done"]) == ([0], [1])
    assert shard_bytes(one.latent(0)) == shard_bytes(full.latent(0))


def test_a_cluster_another_encode_holds_is_refused_naming_it_while_another_cluster_encodes(make_cfg, tmp_path, vae_dir):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    holder = acquire(job_folder(rd, 0), "encode cluster 0")  # a live holder: this very process
    try:
        with pytest.raises(Locked) as refused:
            run_encode(make_cfg, rd, vae_dir, "vae.clusters=0")
        message = str(refused.value)
        assert message.startswith("encode cluster 0: ") and "\n" not in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and holder["started"] in message
        assert not rd.latent(0).exists()

        assert run_encode(make_cfg, rd, vae_dir, "vae.clusters=1")["encoded"] == [1]  # side by side
        assert not (job_folder(rd, 1) / LOCK_NAME).exists()  # released once done
        with pytest.raises(Locked, match="encode cluster 0: "):  # every cluster: refused before any work
            run_encode(make_cfg, rd, vae_dir, "redo=true")
        assert not (job_folder(rd, 1) / LOCK_NAME).exists()  # what it had taken is released
        assert (job_folder(rd, 0) / LOCK_NAME).exists()  # and the holder's lock is untouched
    finally:
        release(job_folder(rd, 0), holder)
    assert run_encode(make_cfg, rd, vae_dir)["encoded"] == [0]


@pytest.mark.parametrize("clusters, named", [("2", "2"), ("[0,5]", "5"), ("-1", "-1"), ("[]", None)])
def test_a_cluster_the_run_does_not_have_is_refused_in_one_line(make_cfg, tmp_path, vae_dir, clusters, named):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    with pytest.raises(BadInput) as refused:
        run_encode(make_cfg, rd, vae_dir, f"vae.clusters={clusters}")
    message = str(refused.value)
    assert message.startswith("vae.clusters=") and "\n" not in message and "0..1" in message
    if named is not None:
        assert f"no cluster {named}, its K=2 clusters" in message
    assert not rd.latents.exists()


def killed_after(monkeypatch, samples: int) -> None:
    """The writer raises at its ``samples``-th sample, as a job stopped mid-way would stop writing."""
    write, count = ShardSetWriter.write, [0]

    def write_until_killed(self, *args, **kwargs):
        count[0] += 1
        if count[0] > samples:
            raise KeyboardInterrupt("killed")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(ShardSetWriter, "write", write_until_killed)


def test_a_killed_encode_leaves_no_complete_looking_folder_and_keeps_the_finished_one(
    make_cfg, tmp_path, vae_dir, monkeypatch
):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    with monkeypatch.context() as patch:
        killed_after(patch, 25)  # two whole shards written, the third begun
        with pytest.raises(KeyboardInterrupt):
            run_encode(make_cfg, rd, vae_dir, "vae.clusters=0")
    assert not rd.latent(0).exists() and not partial_folder(rd, 0).exists()
    assert not (job_folder(rd, 0) / LOCK_NAME).exists()

    run_encode(make_cfg, rd, vae_dir, "vae.clusters=0")
    finished, before = load_manifest(rd.latent(0)), shard_bytes(rd.latent(0))
    with monkeypatch.context() as patch:
        killed_after(patch, 25)
        with pytest.raises(KeyboardInterrupt):
            run_encode(make_cfg, rd, vae_dir, "vae.clusters=0", "redo=true")
    assert verify(rd.latent(0)) == finished and shard_bytes(rd.latent(0)) == before  # intact

    # a kill no handler saw (SIGKILL) leaves its partial set, manifest and all, and the set it was replacing
    # moved aside: neither is where readers look, and the next encode of the cluster clears both
    (partial_folder(rd, 0)).mkdir()
    write_json(partial_folder(rd, 0) / MANIFEST, dict(num_samples=0, shards=[]))
    (job_folder(rd, 0) / "replaced").mkdir()
    assert run_encode(make_cfg, rd, vae_dir, "vae.clusters=0", "redo=true")["encoded"] == [0]
    assert shard_bytes(rd.latent(0)) == before and sorted(p.name for p in job_folder(rd, 0).iterdir()) == [
        "verified.json"
    ]


def test_a_damaged_shard_read_by_a_loader_worker_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(BadInput) as refused:
        list(image_batches([str(bad)], batch_size=4, workers=2))
    assert str(bad) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.gpu
def test_on_a_gpu_batches_run_in_bf16_and_give_the_fp32_latents_closely(make_cfg, tmp_path, vae_dir):
    cpu, gpu = make_partitions(tmp_path / "cpu", sizes=(40, 40)), make_partitions(tmp_path / "gpu", sizes=(40, 40))
    run_encode(make_cfg, cpu, vae_dir, "vae.device=cpu", "vae.clusters=0")
    run_encode(make_cfg, gpu, vae_dir, "vae.device=cuda", "vae.clusters=0")
    manifest = load_manifest(gpu.latent(0))
    assert manifest["encode_precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    want = np.stack([s["latent"] for s in iter_samples(shard_paths(cpu.latent(0), load_manifest(cpu.latent(0))))])
    got = np.stack([s["latent"] for s in iter_samples(shard_paths(gpu.latent(0), manifest))])
    assert got.dtype == np.float16 and got.shape == want.shape
    scale = float(np.abs(want.astype(np.float32)).max())
    assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() < 0.05 * scale  # bf16: ~3 digits
