"""A VAE that maps images to the latents experts train on, and latents back to images.

The paper trains its experts on Stable Diffusion VAE latents (256 px images ->
32x32x4). ``LatentCodec`` wraps a diffusers ``AutoencoderKL`` loaded from a
local folder (``save_pretrained`` layout: ``config.json`` + weights), the
weights file inside one, or a hub id already in the local cache; a hub id is
never fetched unless asked for (``allow_download``), so an offline machine gets
an error at once instead of a hang.

Latents are stored scaled, ``(z - shift) * scale``, the convention of latent
diffusion: unit variance for the SD VAE with scale 0.18215. ``identity()``
names the VAE by the sha256 of its weights and its scale and shift: a run's
manifest records it, and latents made with one VAE are refused by another.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ddm.errors import MissingInput, Unusable
from ddm.io import read_json, sha256_file

log = logging.getLogger("ddm")

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _folder_of(pretrained: str) -> Path | None:
    """The local diffusers folder ``pretrained`` names (a folder, or a weights file inside one), else None."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.parent
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MissingInput(
                f"vae.pretrained={pretrained}: {path} has no config.json; save the VAE with "
                f"AutoencoderKL.save_pretrained(folder) and pass that folder"
            )
        return path
    if pretrained.startswith(("/", "./", "../", "~")) or path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
        raise MissingInput(f"vae.pretrained={pretrained}: no such file or folder")
    return None  # a hub id


def resolve_folder(pretrained: str, allow_download: bool = False) -> Path:
    """The local diffusers folder of ``pretrained``: itself, the folder of a weights file, or a hub id's cache."""
    folder = _folder_of(pretrained)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, local_files_only=not allow_download))
    except Exception as e:  # huggingface_hub raises several kinds for "not cached" and "cannot reach"
        how = (
            "this machine could not fetch it"
            if allow_download
            else "it is not in the local cache and vae.allow_download=false"
        )
        raise Unusable(
            f"vae.pretrained={pretrained}: {how}. Download it where there is internet "
            f"(`huggingface-cli download {pretrained} --local-dir vae/`) and pass the folder, "
            f"or set vae.allow_download=true"
        ) from e


def vae_identity(folder: Path) -> dict:
    """What names a VAE without building it: its weights' sha256 and the scale and shift its latents use."""
    config = read_json(folder / "config.json")
    files = [folder / n for n in WEIGHT_NAMES if (folder / n).exists()]
    if not files:
        raise MissingInput(f"{folder} has no {' or '.join(WEIGHT_NAMES)}: save the VAE with save_pretrained")
    shift = config.get("shift_factor")
    return dict(
        weights_sha256=sha256_file(files[0]),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(shift) if shift is not None else 0.0,
        latent_channels=int(config.get("latent_channels", 4)),
        downsample=2 ** (len(config.get("block_out_channels", [0])) - 1),
    )


class LatentCodec(torch.nn.Module):
    """Images in [-1, 1] <-> scaled latents, through one frozen ``AutoencoderKL``."""

    def __init__(self, vae, source: str, weights_sha256: str | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.source = source  # what the user named: a folder, a weights file or a hub id
        self.weights_sha256 = weights_sha256
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.image_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def load(cls, pretrained: str, allow_download: bool = False) -> LatentCodec:
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:  # pragma: no cover - diffusers is a dependency
            raise Unusable("the latent stages need diffusers: pip install diffusers") from e
        folder = resolve_folder(str(pretrained), allow_download)
        vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)
        return cls(vae, str(pretrained), vae_identity(folder)["weights_sha256"])

    def identity(self) -> dict:
        """What a latent manifest records (``vae_identity`` plus the source): latents are only valid for it."""
        return dict(
            source=self.source,
            weights_sha256=self.weights_sha256,
            scaling_factor=self.scale,
            shift_factor=self.shift,
            latent_channels=self.latent_channels,
            downsample=self.downsample,
        )

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise Unusable(
                f"images of {image_size} px do not divide by the VAE's downsampling factor {self.downsample}: "
                f"resize them (data.resize) to a multiple of it"
            )
        return self.latent_channels, image_size // self.downsample, image_size // self.downsample

    def _to_vae_channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.image_channels:
            return x
        if x.shape[1] == 1:  # grey images through an RGB VAE
            return x.expand(-1, self.image_channels, -1, -1)
        raise Unusable(f"the VAE takes {self.image_channels}-channel images, these have {x.shape[1]}")

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, H, W] in [-1, 1] -> the posterior's scaled mean and its log-variance (unscaled)."""
        dist = self.vae.encode(self._to_vae_channels(x)).latent_dist
        return (dist.mean - self.shift) * self.scale, dist.logvar

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> scaled latents: the posterior mean, or a draw from it when ``generator`` is given."""
        mean, logvar = self.encode_moments(x)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
        return mean + self.scale * torch.exp(0.5 * logvar) * eps

    @torch.no_grad()
    def decode(self, z: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] with ``channels`` channels (grey: the mean of RGB)."""
        x = self.vae.decode(z / self.scale + self.shift).sample.clamp(-1, 1)
        if channels == 1 and x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        return x
