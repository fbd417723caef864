"""Stage ``embed`` and the encoders: alignment with keys, resumability, weights loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.data.sources import SourceMeta
from ddm.embed import PixelEncoder, build_encoder, embedding_file, keys_file, load_embeddings_manifest
from ddm.io import read_json
from ddm.settings import Embed
from ddm.settings.values import build
from ddm.stages import embed, prepare

DIGITS_META = SourceMeta(image_size=8, channels=1, num_classes=10, class_names=None)
SMALL_CLIP = "ViT-S-32-alt"  # the cheapest open_clip architecture on a CPU (about 0.2 s per 16 images at 64 px)


@pytest.fixture
def digits_run(make_cfg):
    """A prepared digits run in 4 shards (500, 500, 500, 297)."""
    cfg = make_cfg("data=digits", "data.shard_size=500")
    prepare.run(cfg)
    return cfg


def digits_images(n: int = 6) -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[:n] * 255 / 16).astype(np.uint8)


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("emb-*.npy")}


def count_shard_calls(monkeypatch) -> list:
    calls = []
    real = embed.embed_shards

    def spy(encoder, paths, batch_size, workers):
        calls.extend(paths)  # the shards handed to the reader: the ones computed
        return real(encoder, paths, batch_size, workers)

    monkeypatch.setattr(embed, "embed_shards", spy)
    return calls


# ------------------------------------------------------------------ the stage


def test_embeddings_aligned_with_keys(digits_run):
    cfg = digits_run
    summary = embed.run(cfg)
    run_dir = RunDir(cfg.run_dir)
    data = load_manifest(run_dir.data)
    manifest = load_embeddings_manifest(run_dir.embeddings)
    assert summary["num_samples"] == manifest["num_samples"] == 1797
    assert manifest["dim"] == 16 * 16 and manifest["encoder"] == "pixels"
    assert manifest["keys_sha256"] == data["keys_sha256"] and len(manifest["shards"]) == 4

    encoder = build_encoder(cfg.embed, SourceMeta.from_manifest(data))
    for index, (entry, path) in enumerate(zip(manifest["shards"], shard_paths(run_dir.data, data))):
        assert entry["embeddings"] == embedding_file(index) and entry["keys"] == keys_file(index)
        emb = np.load(run_dir.embeddings / entry["embeddings"])
        keys = (run_dir.embeddings / entry["keys"]).read_text().splitlines()
        samples = list(iter_samples([path]))
        assert emb.dtype == np.float32 and emb.shape == (len(samples), 256) == (entry["num_samples"], 256)
        assert keys == [s["key"] for s in samples]
        # Row i is the encoding of sample i alone: batching must not reorder or mix rows.
        alone = np.concatenate([encoder(s["image"][None]) for s in samples])
        np.testing.assert_allclose(emb, alone, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_embed_resumes_only_the_missing_shard(digits_run, monkeypatch):
    cfg = digits_run
    embed.run(cfg)
    folder = RunDir(cfg.run_dir).embeddings
    before = mtimes(folder)
    old = np.load(folder / "emb-000002.npy")
    (folder / "emb-000002.npy").unlink()
    (folder / "manifest.json").unlink()

    calls = count_shard_calls(monkeypatch)
    summary = embed.run(cfg)
    assert len(calls) == 1 and calls[0].endswith("shard-000002.tar")
    assert summary["computed_shards"] == 1
    after = mtimes(folder)
    assert {k: v for k, v in after.items() if k != "emb-000002.npy"} == {
        k: v for k, v in before.items() if k != "emb-000002.npy"
    }
    np.testing.assert_array_equal(np.load(folder / "emb-000002.npy"), old)
    assert (folder / "manifest.json").exists()


def test_embed_skips_when_done_and_redo_recomputes(digits_run, make_cfg, monkeypatch):
    embed.run(digits_run)
    marker = RunDir(digits_run.run_dir).embeddings_manifest
    stamp = marker.stat().st_mtime_ns
    calls = count_shard_calls(monkeypatch)
    assert embed.run(digits_run)["skipped"] is True
    assert not calls and marker.stat().st_mtime_ns == stamp

    embed.run(make_cfg("data=digits", "data.shard_size=500", "redo=true"))
    assert len(calls) == 4 and marker.stat().st_mtime_ns != stamp


def test_changed_encoder_discards_old_shard_files(digits_run, make_cfg, monkeypatch):
    embed.run(digits_run)
    folder = RunDir(digits_run.run_dir).embeddings
    (folder / "manifest.json").unlink()  # as if interrupted, then resumed with another setting
    calls = count_shard_calls(monkeypatch)
    summary = embed.run(make_cfg("data=digits", "data.shard_size=500", "embed.size=4"))
    assert len(calls) == 4 and summary["dim"] == 16
    assert np.load(folder / "emb-000000.npy").shape == (500, 16)


def test_embed_needs_prepared_data(make_cfg):
    with pytest.raises(FileNotFoundError, match="manifest"):
        embed.run(make_cfg("data=digits"))


# ------------------------------------------------------------------ pixels encoder


def test_pixels_identical_images_match_and_different_ones_do_not():
    encoder = PixelEncoder(channels=1, size=8)
    a = digits_images(3)
    batch = np.stack([a[0], a[0], np.roll(a[0], 1, axis=1), a[1]])
    rows = encoder(batch)
    assert rows.shape == (4, 64) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[0], rows[1])
    assert np.abs(rows[0] - rows[2]).max() > 1e-2  # shifted by one pixel
    assert np.abs(rows[0] - rows[3]).max() > 1e-2  # another digit
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    # Brightness offset is centred away (values stay inside 0..255 here).
    darker = (a[0].astype(int) // 2).astype(np.uint8)
    brighter = (darker + 100).astype(np.uint8)
    np.testing.assert_allclose(encoder(darker[None]), encoder(brighter[None]), atol=1e-5)


def test_pixels_projection_is_fixed_by_its_seed():
    images = (np.random.default_rng(1).random((5, 12, 12, 3)) * 255).astype(np.uint8)
    one = PixelEncoder(channels=3, size=8, dim=32, seed=0)(images)
    two = PixelEncoder(channels=3, size=8, dim=32, seed=0)(images)
    other = PixelEncoder(channels=3, size=8, dim=32, seed=1)(images)
    assert one.shape == (5, 32)
    np.testing.assert_array_equal(one, two)
    assert np.abs(one - other).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)


def test_unknown_encoder_is_named():
    with pytest.raises(ValueError, match="embed.encoder='dino'.*open_clip"):
        build_encoder(build(Embed, dict(encoder="dino"), "embed"), DIGITS_META)


# ------------------------------------------------------------------ open_clip encoder


def clip_cfg(**kw):
    return build(
        Embed,
        dict(encoder="open_clip", model=SMALL_CLIP, pretrained=None, image_size=64, device="cpu", batch_size=16) | kw,
        "embed",
    )


def test_open_clip_loads_local_weights_exactly(tmp_path):
    import open_clip

    torch.manual_seed(123)
    source = open_clip.create_model(SMALL_CLIP, pretrained=None, force_image_size=64)
    weights = tmp_path / "clip.pt"
    torch.save(source.state_dict(), weights)

    torch.manual_seed(999)  # a different random init, so equality below proves the file was loaded
    encoder = build_encoder(clip_cfg(pretrained=str(weights)), DIGITS_META)
    loaded = encoder.model.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())

    images = digits_images(4)
    rows = encoder(images)
    assert rows.shape == (4, encoder.dim) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(encoder(images), rows, atol=1e-6)  # deterministic
    np.testing.assert_allclose(encoder(images[2:3])[0], rows[2], atol=1e-5)  # independent of the batch
    assert np.abs(rows[0] - rows[1]).max() > 1e-4


def test_open_clip_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_encoder(clip_cfg(pretrained=str(missing)), DIGITS_META)


def test_open_clip_hub_tag_offline_says_to_use_a_local_file():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: a hub download would retry for a long time")
    with pytest.raises(RuntimeError, match="local file"):
        build_encoder(clip_cfg(model="ViT-B-32", pretrained="openai", image_size=None), DIGITS_META)
    with pytest.raises(ValueError, match="neither a file nor a hub tag"):
        build_encoder(clip_cfg(pretrained="no-such-tag"), DIGITS_META)


def test_embed_stage_with_open_clip_is_reproducible(make_cfg):
    overrides = [
        "data=digits",
        "data.limit=40",
        "data.shard_size=20",
        "embed=open_clip",
        f"embed.model={SMALL_CLIP}",
        "embed.image_size=64",
        "embed.device=cpu",
        "embed.batch_size=16",
    ]
    cfg = make_cfg(*overrides)
    prepare.run(cfg)
    embed.run(cfg)
    folder = RunDir(cfg.run_dir).embeddings
    first = np.load(folder / "emb-000001.npy")
    # Random init is seeded by cfg.seed, so a redo reproduces the same rows.
    embed.run(make_cfg(*overrides, "redo=true"))
    np.testing.assert_allclose(np.load(folder / "emb-000001.npy"), first, atol=1e-6)
    manifest = read_json(folder / "manifest.json")
    assert manifest["encoder"] == "open_clip" and manifest["encoder_config"]["model"] == SMALL_CLIP
    assert first.shape == (20, manifest["dim"])


# ------------------------------------------------------------------ torchvision encoder


def torchvision_cfg(**kw):
    return build(
        Embed,
        dict(encoder="torchvision", model="mobilenet_v2", weights=None, image_size=32, device="cpu", batch_size=16)
        | kw,
        "embed",
    )


def saved_mobilenet(path, seed: int = 123):
    import torchvision

    torch.manual_seed(seed)
    source = torchvision.models.mobilenet_v2(weights=None).eval()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    return source


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_features_are_the_loaded_networks_pooled_features(tmp_path, suffix):
    import torch.nn.functional as F

    weights = tmp_path / f"mobilenet_v2{suffix}"
    source = saved_mobilenet(weights)
    torch.manual_seed(999)  # a different random init, so agreement below proves the file was loaded
    encoder = build_encoder(torchvision_cfg(weights=str(weights)), DIGITS_META)
    assert encoder.dim == 1280 and encoder.spec["weights_sha256"] is not None

    images = digits_images(4)
    # by hand: gray -> RGB, resize, ImageNet normalisation, conv trunk, global average pool, unit length
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = F.normalize(F.adaptive_avg_pool2d(source.features(x), 1).flatten(1), dim=1).numpy()
    rows = encoder(images)
    assert rows.shape == (4, 1280) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    assert np.abs(rows[0] - rows[1]).max() > 1e-4


def test_torchvision_weights_digest_names_the_weights_not_the_file(tmp_path):
    saved_mobilenet(tmp_path / "a.pth", seed=1)
    saved_mobilenet(tmp_path / "b.safetensors", seed=1)
    saved_mobilenet(tmp_path / "c.pth", seed=2)
    spec = {
        f: build_encoder(torchvision_cfg(weights=str(tmp_path / f)), DIGITS_META).spec
        for f in ("a.pth", "b.safetensors", "c.pth")
    }
    assert spec["a.pth"] == spec["b.safetensors"] and spec["a.pth"] != spec["c.pth"]


def test_torchvision_bad_inputs_name_the_setting(tmp_path):
    import torchvision

    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"embed.weights={missing}")):
        build_encoder(torchvision_cfg(weights=str(missing)), DIGITS_META)
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(RuntimeError, match=r"embed.weights=.*resnet18.pth does not hold mobilenet_v2's weights"):
        build_encoder(torchvision_cfg(weights=str(other)), DIGITS_META)
    with pytest.raises(ValueError, match="embed.model='dinov2'.*torchvision"):
        build_encoder(torchvision_cfg(model="dinov2"), DIGITS_META)


def test_embed_stage_with_torchvision_weights(make_cfg, tmp_path):
    weights = tmp_path / "mobilenet_v2.pth"
    saved_mobilenet(weights)
    cfg = make_cfg(
        "data=digits",
        "data.limit=40",
        "data.shard_size=20",
        "embed=torchvision",
        f"embed.weights={weights}",
        "embed.image_size=32",
        "embed.device=cpu",
    )
    prepare.run(cfg)
    embed.run(cfg)
    folder = RunDir(cfg.run_dir).embeddings
    manifest = read_json(folder / "manifest.json")
    assert manifest["encoder"] == "torchvision" and manifest["dim"] == 1280 and manifest["num_samples"] == 40
    rows = np.load(folder / "emb-000000.npy")
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
