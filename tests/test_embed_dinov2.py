"""The ``dinov2`` encoder: timm's DINOv2 features from a local weights file, known answers from timm itself.

The networks are the smallest real DINOv2 ViT (ViT-S/14, 22M parameters) with
random weights saved by each test, run at 56 px so a forward pass takes
milliseconds on a CPU.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.data.sources import SourceMeta
from ddm.embed import build_encoder
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.io import read_json
from ddm.settings import Embed
from ddm.settings.values import build
from ddm.stages import embed, prepare

SMALL, SMALL_REG = "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"
SIZE = 56  # a 4 x 4 patch grid
META = SourceMeta(image_size=8, channels=1, num_classes=10, class_names=None)


def dinov2_cfg(**kw):
    values = dict(encoder="dinov2", model=SMALL, weights=None, pool="cls", image_size=SIZE, device="cpu")
    return build(Embed, values | dict(batch_size=8) | kw, "embed")


def save_model(path, model: str = SMALL, seed: int = 0, img_size: int = SIZE, edit=None) -> torch.nn.Module:
    """A randomly initialised timm DINOv2 (seeded), its state dict saved to ``path``; ``edit`` changes the dict."""
    torch.manual_seed(seed)
    source = timm.create_model(model, pretrained=False, num_classes=0, img_size=img_size).eval()
    # timm starts the tokens near zero and the blocks' LayerScale at 1e-5, so a fresh network's CLS token hardly
    # sees the image: make both matter, or a wrong token or image would go unnoticed
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed"):
                p.normal_()
            elif name.endswith(".gamma"):
                p.fill_(1.0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if edit:
        state = edit(state)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return source


def images(n: int = 4, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(n, 20, 24, 3) if rgb else (n, 20, 24), dtype=np.uint8)


def by_hand(source: torch.nn.Module, batch: np.ndarray, pool: str = "cls") -> np.ndarray:
    """gray -> RGB, bicubic resize, ImageNet normalisation, timm's final normed tokens, pooled, unit length."""
    x = torch.from_numpy(batch).float().div(255)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        tokens = source.forward_features(x)
    features = tokens[:, 0] if pool == "cls" else tokens[:, source.num_prefix_tokens :].mean(1)
    return F.normalize(features, dim=1).numpy()


@pytest.mark.parametrize(("model", "suffix", "rgb"), [(SMALL, ".pth", False), (SMALL_REG, ".safetensors", True)])
def test_rows_are_the_timm_models_final_cls_token(tmp_path, model, suffix, rgb):
    weights = tmp_path / f"w{suffix}"
    source = save_model(weights, model)
    torch.manual_seed(999)  # another random init: agreement below proves the file was loaded
    encoder = build_encoder(dinov2_cfg(model=model, weights=str(weights)), META)
    assert encoder.dim == 384

    batch = images(rgb=rgb)
    rows = encoder(batch)
    assert rows.shape == (4, 384) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, by_hand(source, batch), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    assert np.abs(rows[0] - rows[1]).max() > 1e-3
    # row i depends on image i alone
    np.testing.assert_allclose(encoder(batch[2:3]), rows[2:3], atol=1e-5)


def test_mean_pool_averages_the_patch_tokens_and_leaves_out_the_registers(tmp_path):
    source = save_model(tmp_path / "w.pth", SMALL_REG)
    encoder = build_encoder(dinov2_cfg(model=SMALL_REG, weights=str(tmp_path / "w.pth"), pool="mean"), META)
    batch = images()
    rows = encoder(batch)
    np.testing.assert_allclose(rows, by_hand(source, batch, pool="mean"), atol=1e-5)
    with torch.no_grad():  # the mean over CLS, registers and patches is a different answer
        x = torch.randn(1, 3, SIZE, SIZE)
        tokens = source.forward_features(x)
    assert source.num_prefix_tokens == 5
    assert not torch.allclose(tokens[:, 5:].mean(1), tokens[:, 1:].mean(1), atol=1e-3)
    assert encoder.spec["pool"] == "mean"


def test_weights_trained_at_518_px_are_resampled_to_the_image_size(tmp_path):
    """A position embedding that is the same vector at every place of the 37 x 37 grid is that vector at every
    place of the 4 x 4 grid: the loaded network then equals one built at 56 px with that embedding."""
    torch.manual_seed(3)
    place = torch.randn(1, 1, 384)

    def constant_grid(state):
        state["pos_embed"][:, 1:] = place
        return state

    big = save_model(tmp_path / "w518.pth", SMALL, img_size=518, edit=constant_grid)
    assert big.pos_embed.shape[1] == 1 + 37 * 37
    encoder = build_encoder(dinov2_cfg(weights=str(tmp_path / "w518.pth")), META)
    assert encoder.net.pos_embed.shape[1] == 1 + 4 * 4

    small = timm.create_model(SMALL, pretrained=False, num_classes=0, img_size=SIZE).eval()
    state = constant_grid(big.state_dict())
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], place.expand(1, 16, 384)], dim=1)
    small.load_state_dict(state)
    batch = images()
    np.testing.assert_allclose(encoder(batch), by_hand(small, batch), atol=1e-4)


def to_meta_layout(state, p0=None):
    """timm's DINOv2 state dict as Meta's checkpoint holds it: a mask token, and with registers, the registers as
    ``register_tokens`` and the CLS position inside ``pos_embed`` (timm folds it into ``cls_token``)."""
    state = dict(state)
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - p0
        state["pos_embed"] = torch.cat([p0, state["pos_embed"]], dim=1)
    return state


def test_metas_checkpoint_layout_gives_the_same_network(tmp_path):
    save_model(tmp_path / "timm.pth", SMALL, seed=5)
    save_model(tmp_path / "meta.pth", SMALL, seed=5, edit=to_meta_layout)
    same = [build_encoder(dinov2_cfg(weights=str(tmp_path / f)), META) for f in ("timm.pth", "meta.pth")]
    assert same[0].spec == same[1].spec  # the digest names the weights, not their layout

    p0 = torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(1))
    source = save_model(tmp_path / "meta_reg.pth", SMALL_REG, seed=6, edit=lambda s: to_meta_layout(s, p0))
    encoder = build_encoder(dinov2_cfg(model=SMALL_REG, weights=str(tmp_path / "meta_reg.pth")), META)
    batch = images()
    np.testing.assert_allclose(encoder(batch), by_hand(source, batch), atol=1e-4)


def test_a_half_precision_file_runs_in_float32(tmp_path):
    source = save_model(tmp_path / "half.pth", SMALL_REG, edit=lambda s: {k: v.half() for k, v in s.items()})
    encoder = build_encoder(dinov2_cfg(model=SMALL_REG, weights=str(tmp_path / "half.pth")), META)
    assert {p.dtype for p in encoder.net.parameters()} == {torch.float32}
    batch = images()
    np.testing.assert_allclose(encoder(batch), by_hand(source.half().float(), batch), atol=1e-5)


def test_spec_names_model_pool_size_and_the_weights(tmp_path, caplog):
    save_model(tmp_path / "a.pth", seed=1)
    save_model(tmp_path / "a.safetensors", seed=1)
    save_model(tmp_path / "b.pth", seed=2)
    spec = {f: build_encoder(dinov2_cfg(weights=str(tmp_path / f)), META).spec for f in ("a.pth", "a.safetensors")}
    other = build_encoder(dinov2_cfg(weights=str(tmp_path / "b.pth")), META).spec
    assert spec["a.pth"] == spec["a.safetensors"]
    assert re.fullmatch(r"[0-9a-f]{64}", spec["a.pth"]["weights_sha256"])
    assert other["weights_sha256"] != spec["a.pth"]["weights_sha256"]
    assert {k: v for k, v in spec["a.pth"].items() if k != "weights_sha256"} == dict(
        encoder="dinov2", model=SMALL, pool="cls", image_size=SIZE
    )
    with caplog.at_level(logging.WARNING, logger="ddm"):
        random = build_encoder(dinov2_cfg(weights=None), META)
    assert random.spec["weights_sha256"] is None
    assert "RANDOM weights" in caplog.text and "meaningless" in caplog.text


def test_bad_inputs_are_refused_in_one_line_naming_the_key(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingInput, match=re.escape(f"embed.weights={missing}: no such weights file")):
        build_encoder(dinov2_cfg(weights=str(missing)), META)
    with pytest.raises(BadInput, match=r"embed.model='vit_small_patch16_224' is not a DINOv2 model.*reg4"):
        build_encoder(dinov2_cfg(model="vit_small_patch16_224"), META)
    with pytest.raises(BadInput, match=r"embed.image_size=50 is not a positive multiple of 14.*42 or 56"):
        build_encoder(dinov2_cfg(image_size=50), META)
    with pytest.raises(BadInput, match=r"embed.pool='max' is not 'cls' or 'mean'"):
        dinov2_cfg(pool="max")

    # registers where the model has none, another ViT (narrower, 16 px patches), not a state dict at all: each
    # refused naming the file
    save_model(tmp_path / "reg4.pth", SMALL_REG)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), tmp_path / "tiny.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    for name in ("reg4.pth", "tiny.pth", "notes.pth"):
        path = tmp_path / name
        with pytest.raises(Unusable, match=re.escape(f"embed.weights={path} does not hold {SMALL}'s weights")) as e:
            build_encoder(dinov2_cfg(weights=str(path)), META)
        assert "\n" not in str(e.value)


def test_embed_stage_with_dinov2_weights(make_cfg, tmp_path):
    weights = tmp_path / "dinov2_vits14.safetensors"
    save_model(weights, SMALL)
    cfg = make_cfg(
        "data=digits",
        "data.limit=24",
        "data.shard_size=12",
        "embed=dinov2",
        f"embed.model={SMALL}",
        f"embed.weights={weights}",
        "embed.image_size=28",
        "embed.device=cpu",
        "embed.batch_size=5",
    )
    prepare.run(cfg)
    embed.run(cfg)
    run_dir = RunDir(cfg.run_dir)
    manifest = read_json(run_dir.embeddings / "manifest.json")
    assert manifest["encoder"] == "dinov2" and manifest["dim"] == 384 and manifest["num_samples"] == 24
    assert manifest["encoder_spec"]["weights_sha256"] and manifest["encoder_spec"]["pool"] == "cls"

    encoder = build_encoder(cfg.embed, META)
    path = shard_paths(run_dir.data, load_manifest(run_dir.data))[1]
    alone = np.concatenate([encoder(s["image"][None]) for s in iter_samples([path])])
    np.testing.assert_allclose(np.load(run_dir.embeddings / "emb-000001.npy"), alone, atol=1e-5)
