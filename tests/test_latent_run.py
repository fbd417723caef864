"""A tiny latent run end to end: partitions encoded by a small random VAE, latent experts, decoded samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, iter_shard, load_manifest, shard_paths
from ddm.errors import BadInput, MissingInput
from ddm.images import batch_to_model_space
from ddm.latent import LatentCodec
from ddm.stages.runner import run_stage
from tests.test_evaluate_stage import OVERRIDES as EVAL_OVERRIDES
from tests.test_latent_vae import save_tiny_vae

FAST_EVAL = [o for o in EVAL_OVERRIDES if o.startswith("eval.")]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    save_tiny_vae(folder, in_channels=3, scaling_factor=0.5)
    return folder


def over(vae_dir, *more):
    return ["experiment=tiny", "vae=sd", f"vae.pretrained={vae_dir}", "expert.steps=4", "router.steps=4", *more]


def test_a_latent_run_trains_on_latents_and_samples_images(make_cfg, vae_dir):
    cfg = make_cfg(*over(vae_dir))
    rd = RunDir(cfg.run_dir)
    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, cfg)
    with pytest.raises(MissingInput, match="run `ddm encode`"):
        run_stage("train-expert", cfg)
    summary = run_stage("encode", cfg)
    assert summary["encoded"] == [0, 1]

    # the latents: the partition's samples in its order, 8x8 grey -> 4x4x4, bit-equal to encoding them now
    codec = LatentCodec.load(str(vae_dir))
    for k in (0, 1):
        partition, latents = load_manifest(rd.partition(k)), load_manifest(rd.latent(k))
        assert latents["keys_sha256"] == partition["keys_sha256"]
        assert (latents["channels"], latents["image_size"], latents["pixel_size"]) == (4, 4, 8)
        assert latents["vae"]["weights_sha256"] == codec.identity()["weights_sha256"]
        images = list(iter_samples(shard_paths(rd.partition(k), partition)))
        stored = list(iter_samples(shard_paths(rd.latent(k), latents)))
        assert [s["key"] for s in stored] == [s["key"] for s in images]
        x = batch_to_model_space(np.stack([s["image"] for s in images[:16]]))
        want = codec.encode(x).numpy().astype(np.float16)
        assert np.array_equal(np.stack([s["latent"] for s in stored[:16]]), want)
        assert [s["label"] for s in stored] == [s["label"] for s in images]
    assert run_stage("encode", cfg)["encoded"] == []  # done: skipped

    for k in (0, 1):
        run_stage("train-expert", make_cfg(*over(vae_dir, f"expert.id={k}")))
    run_stage("train-router", cfg)
    expert = torch.load(rd.expert_weights(0), weights_only=False)
    assert (expert["model_config"]["in_channels"], expert["model_config"]["image_size"]) == (4, 4)
    assert expert["latents"]["vae"]["weights_sha256"] == codec.identity()["weights_sha256"]

    record = run_stage("sample", make_cfg(*over(vae_dir, "sample.num_samples=8")))
    saved = np.load(rd.samples / "samples.npz")
    assert saved["images"].shape == (record["num_images"], 8, 8) and saved["images"].dtype == np.uint8

    # evaluate: decoded samples against held-out images; FM loss and router on the held-out images' latents
    metrics = run_stage("evaluate", make_cfg(*over(vae_dir, *FAST_EVAL, f"eval.feature_net.cache_dir={rd.root}/c")))
    assert metrics["run"]["image_shape"] == [4, 4, 4]
    ((_, space),) = metrics["feature_spaces"].items()
    row = space["strategies"]["top1"]
    assert row["num_generated"] == 40 and np.isfinite(row["fd"]) and 0 <= row["classifier_accuracy"] <= 1
    assert all(m["mean"] > 0 for m in metrics["fm_loss"]["models"].values())
    assert all(0 <= b["accuracy"] <= 1 for b in metrics["router"]["buckets"])

    # routed by the clusters: the router decodes each x0 estimate and embeds it as the embed stage embedded images.
    # Fitting its temperature encodes held-out images with the VAE and denoises them with their own expert; these
    # 4-step experts' estimates say nothing of the cluster, which the stage says
    with pytest.raises(BadInput, match=r"fit-route-tau found no temperature .* sample.route_tau=null"):
        run_stage("fit-route-tau", make_cfg(*over(vae_dir, *FAST_EVAL)))
    free = ("sample.router=clusters", "sample.strategy=sample", "sample.num_samples=8")
    routed = run_stage("sample", make_cfg(*over(vae_dir, *free)))
    assert routed["settings"]["router"] == "clusters"
    images = np.load(rd.samples / "samples.npz")["images"]
    assert images.shape == (routed["num_images"], 8, 8) and images.dtype == np.uint8


def test_latents_of_another_vae_are_refused(make_cfg, vae_dir, tmp_path):
    cfg = make_cfg(*over(vae_dir, "cluster.k=1"))
    for stage in ("prepare", "embed", "cluster", "partition", "encode", "train-expert", "train-router"):
        run_stage(stage, cfg)
    other = tmp_path / "other-vae"
    save_tiny_vae(other, in_channels=3, scaling_factor=0.25)
    with pytest.raises(BadInput, match="latents of another VAE"):
        run_stage("sample", make_cfg(*over(other, "cluster.k=1")))
    # encoding with the other VAE is not skipped: its latents are made anew, and the old experts no longer match
    assert run_stage("encode", make_cfg(*over(other, "cluster.k=1")))["encoded"] == [0]
    assert load_manifest(RunDir(cfg.run_dir).latent(0))["vae"]["scaling_factor"] == 0.25


def test_a_vae_run_needs_its_vae(make_cfg):
    with pytest.raises(BadInput, match="vae=sd needs vae.pretrained"):
        run_stage("encode", make_cfg("experiment=tiny", "vae=sd"))
    assert run_stage("encode", make_cfg("experiment=tiny"))["vae"] is None  # vae=none: nothing to do


def test_flipped_latents_are_stored_and_taken_half_of_the_time(make_cfg, vae_dir):
    from ddm.data.loader import seeded_flip

    cfg = make_cfg(*over(vae_dir, "cluster.k=1", "vae.flip=true"))
    for stage in ("prepare", "embed", "cluster", "partition", "encode"):
        run_stage(stage, cfg)
    rd = RunDir(cfg.run_dir)
    latents = load_manifest(rd.latent(0))
    assert latents["flip"] is True
    raw = next(iter_shard(shard_paths(rd.latent(0), latents)[0]))
    images = list(iter_samples(shard_paths(rd.partition(0), load_manifest(rd.partition(0)))))
    x = batch_to_model_space(np.stack([images[0]["image"]]))
    codec = LatentCodec.load(str(vae_dir))
    stored = np.load(io.BytesIO(raw["flip.npy"]))
    want = codec.encode(x.flip(-1)).numpy()[0]  # encoded alone here, in a batch there: fp16 rounding apart
    np.testing.assert_allclose(stored.astype(np.float32), want, atol=2e-3)
    assert not np.allclose(stored, np.load(io.BytesIO(raw["npy"])), atol=1e-2)  # not the unflipped latent

    samples = [{"__key__": str(i), "npy": "plain", "flip.npy": "mirrored"} for i in range(400)]
    taken = [s["npy"] for s in seeded_flip(3)(iter(samples))]
    assert all("flip.npy" not in s for s in seeded_flip(3)(iter(samples)))
    assert 150 < taken.count("mirrored") < 250  # about half (binomial sd 10)
    assert taken == [s["npy"] for s in seeded_flip(3)(iter(samples))]  # reproducible for a seed
    assert taken != [s["npy"] for s in seeded_flip(4)(iter(samples))]
