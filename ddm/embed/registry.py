"""Image encoders for clustering: uint8 images in, L2-normalised float32 rows out.

Every encoder has ``.name``, ``.dim``, ``.spec`` (the options that change its
output, recorded with the embeddings) and ``__call__(images) -> [B, dim]``,
where ``images`` is a uint8 array ``[B, H, W]`` (grayscale) or ``[B, H, W, 3]``.

Rows are unit length so that k-means with faiss (L2 or inner product) is
spherical k-means, i.e. clusters by cosine similarity, as is usual for
CLIP/DINO features. (An all-constant image has no direction in the ``pixels``
encoder and maps to the zero vector.)

Encoders (``embed.encoder``):

- ``pixels``: downsampled pixels, centred and normalised, optionally through a
  fixed random projection. Needs no weights; clusters follow layout and
  brightness, not meaning. The default, because no pretrained weights can be
  downloaded on machines without internet.
- ``open_clip``: an open_clip image tower (``embed.model``) with weights from
  a local file, a hub tag (needs internet) or random init (for tests only).
- ``torchvision``: the pooled features of a torchvision classifier
  (``embed.model``, e.g. ``mobilenet_v2``, ``resnet50``) with its state dict from
  a local file (``embed.weights``); never downloads. Pretrained ImageNet
  features cluster by meaning, as the paper's DINOv2 features do.
- ``dinov2``: DINOv2 features (timm's ViT-S/B/L/G, with or without registers,
  ``embed.model``), the paper's clustering embedding: the final CLS token or the
  mean of the patch tokens (``embed.pool``), weights from a local file only
  (``embed.weights``, timm's or Meta's layout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ddm.embed.base import WEIGHT_SUFFIXES, Encoder
from ddm.embed.dinov2 import DinoV2Encoder
from ddm.embed.openclip import OpenClipEncoder
from ddm.embed.pixels import PixelEncoder
from ddm.embed.torchvision_features import TorchvisionEncoder
from ddm.errors import BadInput
from ddm.settings import Embed

__all__ = [
    "ENCODERS",
    "WEIGHT_SUFFIXES",
    "DinoV2Encoder",
    "Encoder",
    "OpenClipEncoder",
    "PixelEncoder",
    "TorchvisionEncoder",
    "build_encoder",
]

log = logging.getLogger("ddm")


def _build_pixels(cfg: Embed, meta) -> PixelEncoder:
    log.info(
        "embed: 'pixels' encoder (downsampled pixels: needs no pretrained weights); for clusters by "
        "meaning use embed=dinov2 (the paper's encoder) or embed=torchvision with a local embed.weights file "
        "(`make weights` fetches MobileNetV2), or embed=open_clip with a local embed.pretrained file"
    )
    return PixelEncoder(channels=meta.channels, size=cfg.size, dim=cfg.dim, seed=cfg.seed)


def _build_open_clip(cfg: Embed, meta) -> OpenClipEncoder:
    return OpenClipEncoder(
        model=cfg.model,
        pretrained=cfg.pretrained,
        image_size=cfg.image_size,
        device=cfg.device,
    )


def _build_torchvision(cfg: Embed, meta) -> TorchvisionEncoder:
    return TorchvisionEncoder(
        model=cfg.model,
        weights=cfg.weights,
        image_size=cfg.image_size or 96,
        device=cfg.device,
    )


def _build_dinov2(cfg: Embed, meta) -> DinoV2Encoder:
    return DinoV2Encoder(
        model=cfg.model or "vit_small_patch14_reg4_dinov2",
        weights=cfg.weights,
        pool=cfg.pool or "cls",
        image_size=cfg.image_size or 224,
        device=cfg.device,
    )


ENCODERS: dict[str, Callable] = {
    "pixels": _build_pixels,
    "open_clip": _build_open_clip,
    "torchvision": _build_torchvision,
    "dinov2": _build_dinov2,
}


def build_encoder(cfg_embed: Embed, data_meta) -> Encoder:
    """The encoder named by ``cfg_embed.encoder``, for images described by ``data_meta`` (a SourceMeta)."""
    name = cfg_embed.encoder
    if name not in ENCODERS:
        raise BadInput(f"embed.encoder={name!r} is not a known encoder; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](cfg_embed, data_meta)
