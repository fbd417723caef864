"""The latent codec: a small random AutoencoderKL saved to a folder and loaded through the real path."""

from __future__ import annotations

import socket

import pytest
import torch

from ddm.errors import MissingInput, Unusable
from ddm.latent import LatentCodec


def tiny_vae(in_channels: int = 3, scaling_factor: float = 0.5, shift_factor: float | None = None):
    """A random two-level AutoencoderKL (16 px -> 4x8x8), seeded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def save_tiny_vae(folder, in_channels: int = 3, scaling_factor: float = 0.5, shift_factor: float | None = None):
    """``tiny_vae`` in ``save_pretrained`` layout."""
    vae = tiny_vae(in_channels, scaling_factor, shift_factor)
    vae.save_pretrained(folder)
    return vae


def test_a_saved_vae_loads_from_its_folder_and_its_weights_file(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.25)
    a = LatentCodec.load(str(tmp_path / "vae"))
    b = LatentCodec.load(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.identity() == dict(b.identity(), source=a.source)
    assert a.identity()["scaling_factor"] == 0.5 and a.identity()["shift_factor"] == 0.25
    assert a.latent_shape(3, 16) == (4, 8, 8) and a.downsample == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, _ = a.encode_moments(x)
    raw = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(mean, (raw - 0.25) * 0.5)  # stored latents are (z - shift) * scale
    torch.testing.assert_close(a.decode(mean), vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_another_vae_has_another_identity(tmp_path):
    save_tiny_vae(tmp_path / "one")
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(tmp_path / "one", low_cpu_mem_usage=False)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "two")
    ids = [LatentCodec.load(str(tmp_path / n)).identity()["weights_sha256"] for n in ("one", "two")]
    assert ids[0] != ids[1] and all(len(i) == 64 for i in ids)


def test_a_posterior_draw_has_the_posterior_spread(tmp_path):
    save_tiny_vae(tmp_path / "vae", scaling_factor=0.5)
    codec = LatentCodec.load(str(tmp_path / "vae"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mean, logvar = codec.encode_moments(x)
    draws = torch.stack([codec.encode(x, torch.Generator().manual_seed(s)) for s in range(400)])
    std = 0.5 * torch.exp(0.5 * logvar)  # scaled
    torch.testing.assert_close(draws.mean(0), mean, atol=float(4 * std.max() / 20), rtol=0)
    assert torch.allclose(draws.std(0), std, rtol=0.2)
    assert torch.equal(codec.encode(x), mean)  # no generator: the mean


def test_grey_images_go_through_an_rgb_vae_and_come_back_grey(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    codec = LatentCodec.load(str(tmp_path / "vae"))
    z = codec.encode(torch.zeros(2, 1, 16, 16))
    assert z.shape == (2, 4, 8, 8)
    assert codec.decode(z, channels=1).shape == (2, 1, 16, 16)
    with pytest.raises(Unusable, match="do not divide"):
        codec.latent_shape(1, 15)


def test_missing_and_offline_vaes_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(MissingInput, match="no such file or folder"):
        LatentCodec.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInput, match="no config.json"):
        LatentCodec.load(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache

    def no_network(*args, **kwargs):
        raise AssertionError("a hub id must be looked up in the local cache only, never fetched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(Unusable, match="not in the local cache.*huggingface-cli download"):
        LatentCodec.load("stabilityai/sd-vae-ft-ema")
