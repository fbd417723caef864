"""The latents of a run: which VAE it uses, the checks of a latent shard set, and the VAE in both directions.

The ``encode`` stage writes ``latents/cluster-KK/``; training, sampling and evaluation
read them through these functions, so one check decides whether latents belong to a
partition and to the VAE that will decode them.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ddm.artifacts import RunDir
from ddm.data.shards import MANIFEST, load_manifest, verify
from ddm.devices import autocast_dtype, to_device
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.images import model_space_on
from ddm.latent.vae import LatentCodec, resolve_folder, vae_identity
from ddm.settings import Settings
from ddm.text.spec import group_kind, stored_text_spec

log = logging.getLogger("ddm")

KINDS = ("none", "autoencoder_kl")


def vae_spec(cfg: Settings) -> dict | None:
    """The run's VAE (the ``vae`` settings group), or None for a pixel run."""
    kind, section = group_kind(cfg, "vae", KINDS)
    if kind == "none":
        return None
    if not section.pretrained:
        raise BadInput("vae=sd needs vae.pretrained: a local AutoencoderKL folder (or a hub id in the local cache)")
    return dict(kind=kind, pretrained=str(section.pretrained), allow_download=bool(section.allow_download))


def current_identity(spec: dict) -> dict:
    """The configured VAE's identity, from its files alone (no model is built)."""
    return vae_identity(resolve_folder(spec["pretrained"], spec["allow_download"]))


def same_vae(recorded: dict | None, identity: dict) -> bool:
    keys = ("weights_sha256", "scaling_factor", "shift_factor")
    return recorded is not None and all(recorded.get(k) == identity[k] for k in keys)


def check_latents_source(manifest: dict, partition: dict, where) -> None:
    """Refuse latents that were encoded from other samples than the partition's."""
    if (manifest.get("keys_sha256"), manifest.get("clustering_id")) != (
        partition.get("keys_sha256"),
        partition.get("clustering_id"),
    ):
        raise BadInput(
            f"{where} was encoded from other partitions (clustering {manifest.get('clustering_id')}, keys "
            f"{str(manifest.get('keys_sha256'))[:12]}..., but the partition is clustering "
            f"{partition.get('clustering_id')}, keys {str(partition.get('keys_sha256'))[:12]}...; a reclustering "
            f"since, or copied from another run?): run `ddm encode redo=true`"
        )


def check_vae(recorded: dict | None, identity: dict, where) -> None:
    """Refuse to decode (or reuse) latents with another VAE than the one they were made with."""
    if not same_vae(recorded, identity):
        recorded = recorded or {}
        raise BadInput(
            f"{where} holds latents of another VAE ({recorded.get('source')}, weights "
            f"{str(recorded.get('weights_sha256'))[:12]}...) than vae.pretrained gives "
            f"({identity['weights_sha256'][:12]}...): set vae.pretrained to the VAE they were made with, "
            f"or encode again (`ddm encode redo=true`) and retrain"
        )


def latent_meta(manifest: dict) -> dict | None:
    """What expert.pt and router.pt record of a latent shard set: the VAE and the pixel shape (None for pixels)."""
    if "vae" not in manifest:
        return None
    return dict(vae=manifest["vae"], image_channels=manifest["image_channels"], pixel_size=manifest["pixel_size"])


def latent_manifest(rd: RunDir, k: int, partition: dict, verify_shards: bool, vae: dict | None = None) -> dict:
    """Cluster ``k``'s latent shard set, checked against its partition (what a latent expert trains on).

    ``vae``: the run's ``vae_spec``, to refuse latents of another VAE before anything trains on them
    (skipped, with a warning, where the VAE's files are not on this machine: the sampler checks it).
    """
    folder = rd.latent(k)
    if not (folder / MANIFEST).exists():
        raise MissingInput(f"no latents at {folder}: run `ddm encode` (vae=... is set, so experts train on latents)")
    manifest = verify(folder) if verify_shards else load_manifest(folder)
    check_latents_source(manifest, partition, folder)
    if vae is not None:
        try:
            identity = current_identity(vae)
        except Unusable as e:
            log.warning("cannot check which VAE %s was encoded with here: %s", folder, e)
        else:
            check_vae(manifest.get("vae"), identity, folder)
    return manifest


def stored_text_of(manifest: dict) -> dict | None:
    """The text tower whose encodings a latent shard set holds (None: captions only)."""
    return manifest.get("text")


def stored_text_length(cfg: Settings, manifest: dict, where) -> int:
    """With ``text.store=true``: the context length the loader pads stored encodings to, once the shard set's
    tower is checked against the run's; 0 when the job encodes captions itself."""
    wanted = stored_text_spec(cfg)
    if wanted is None:
        return 0
    recorded = stored_text_of(manifest)
    if recorded is None:
        raise MissingInput(f"{where} holds no caption encodings (text.store=true): run `ddm encode redo=true`")
    if not same_text(recorded, wanted):
        raise BadInput(
            f"{where} holds caption encodings of another text tower ({recorded.get('model')}, weights "
            f"{str(recorded.get('weights_sha256'))[:12]}...) than text.model/text.pretrained give: encode again "
            f"(`ddm encode redo=true`)"
        )
    return int(recorded["context_length"])


def same_text(recorded: dict | None, wanted: dict | None) -> bool:
    keys = ("model", "weights_sha256", "init_seed")
    if recorded is None or wanted is None:
        return recorded is wanted
    return all(recorded.get(k) == wanted.get(k) for k in keys)


class RunLatents:
    """A latent run's VAE in both directions, in batches: images in [-1, 1] <-> the experts' latents.

    ``precision`` is ``vae.precision``: ``auto`` runs the VAE under bf16 autocast
    on a GPU that has it (as ``ddm encode`` does) and in fp32 on the CPU.
    """

    def __init__(self, codec: LatentCodec, image_channels: int, batch_size: int, precision: str | None = "auto"):
        self.codec, self.image_channels, self.batch_size = codec, int(image_channels), int(batch_size)
        self.precision = precision

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the VAE is autocast to on its device (None: fp32)."""
        return autocast_dtype(self.precision, self.device, "vae.precision")

    def _precision(self):
        dtype = self.autocast
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def encode(self, x) -> torch.Tensor:
        """Images -> latents (the posterior means), on the CPU.

        ``x``: float [N, C, H, W] in [-1, 1], or uint8 pixels [N, H, W(, C)] (a
        quarter of the bytes cross to the VAE's device; scaled there).
        """
        b, device = self.batch_size, self.device
        out = []
        with self._precision():
            for i in range(0, len(x), b):
                out.append(self.codec.encode(model_space_on(x[i : i + b], device)).float())
        return torch.cat(out).cpu()  # one read on the host, after every batch

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [-1, 1] with the data's channels, where ``z`` is.

        Each batch runs on the VAE's device (bf16 autocast there on a GPU, see ``precision``). Latents already
        there (the sampler's) stay there: nothing crosses to the host. Latents elsewhere get each batch's images
        back as it is done, so the VAE's device never holds more than one batch of images.
        """
        b, device = self.batch_size, self.device
        out = []
        with self._precision():
            for i in range(0, len(z), b):
                x = self.codec.decode(to_device(z[i : i + b], device).float(), self.image_channels)
                out.append(x.float().to(z.device))
        return torch.cat(out)


def run_latents(cfg: Settings, latents: dict | None, device) -> RunLatents | None:
    """The VAE of a latent run's networks (``latents``: what expert.pt recorded), or None for a pixel run.

    The VAE is ``vae.pretrained`` when the config names one, else the source the
    latents recorded; either way it must be the VAE the latents were made with.
    """
    if latents is None:
        return None
    spec = vae_spec(cfg)
    source = spec["pretrained"] if spec else latents["vae"].get("source")
    allow = bool(spec and spec["allow_download"])
    check_vae(latents["vae"], vae_identity(resolve_folder(source, allow)), f"the experts' expert.pt (vae {source})")
    codec = LatentCodec.load(source, allow).to(device)
    return RunLatents(codec, int(latents["image_channels"]), int(cfg.vae.batch_size or 64), cfg.vae.precision)


def latent_decoder(cfg: Settings, latents: dict | None, device):
    """``decode(z) -> images in [-1, 1]`` for a latent run's samples, or None for a pixel run."""
    space = run_latents(cfg, latents, device)
    return None if space is None else space.decode
