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
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from ddm.devices import resolve_device
from ddm.errors import BadInput, MissingInput, Unusable

log = logging.getLogger("ddm")

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Encoder(Protocol):
    name: str
    dim: int
    spec: dict

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W] or [B,H,W,C] -> float [B,C,H,W] in 0..1."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


class PixelEncoder:
    """Pixels at ``size`` x ``size``, centred per image, L2-normalised; optional random projection to ``dim``."""

    name = "pixels"

    def __init__(self, channels: int, size: int = 16, dim: int | None = None, seed: int = 0):
        self.size = int(size)
        self.channels = int(channels)
        flat = self.channels * self.size * self.size
        self.dim = int(dim) if dim else flat
        self.spec = dict(encoder=self.name, size=self.size, channels=self.channels, dim=dim, seed=seed)
        # A fixed Gaussian projection (Johnson-Lindenstrauss) keeps cosine similarities
        # approximately while shrinking big images; numpy's seeded generator makes it
        # the same on every machine, so resumed runs produce matching rows.
        self.projection = None
        if dim:
            rng = np.random.default_rng(seed)
            self.projection = torch.from_numpy(rng.standard_normal((flat, self.dim), dtype=np.float32))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _to_nchw(images)
        if x.shape[1] != self.channels:
            raise BadInput(f"pixels encoder was built for {self.channels} channels but got images of shape "
                             f"{images.shape[1:]}")
        # antialias: downsampling without it aliases fine texture into the embedding.
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x.flatten(1)
        # Centring removes overall brightness, so the direction encodes the pattern.
        x = x - x.mean(dim=1, keepdim=True)
        x = F.normalize(x, dim=1)
        if self.projection is not None:
            x = F.normalize(x @ self.projection, dim=1)
        return x.numpy().astype(np.float32, copy=False)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).exists()


class OpenClipEncoder:
    """The image tower of an open_clip model; features are L2-normalised ``encode_image`` outputs."""

    name = "open_clip"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, image_size: int | None = None,
                 device: str | None = "auto"):
        import open_clip

        if model not in open_clip.list_models():
            raise BadInput(f"embed.model={model!r} is not an open_clip model; see open_clip.list_models(), "
                             f"e.g. ViT-B-32, ViT-S-32-alt, RN50")
        pretrained = str(pretrained) if pretrained else None
        self.device = resolve_device(device, "embed.device")
        kwargs = dict(force_image_size=int(image_size)) if image_size else {}
        self.model, self.preprocess = _create_open_clip(open_clip, model, pretrained, kwargs)
        self.model.to(self.device).eval()
        self.dim = int(open_clip.get_model_config(model)["embed_dim"])
        self.spec = dict(encoder=self.name, model=model, pretrained=pretrained, image_size=image_size)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        # open_clip's transforms expect RGB PIL images; grayscale is copied into three channels.
        batch = torch.stack([self.preprocess(Image.fromarray(im).convert("RGB")) for im in images])
        features = self.model.encode_image(batch.to(self.device))
        return F.normalize(features.float(), dim=1).cpu().numpy()


def _create_open_clip(open_clip, model: str, pretrained: str | None, kwargs: dict):
    """(model, eval preprocess) with weights from nowhere, a local file or the hub; clear errors for each."""
    if pretrained is None:
        log.warning(f"embed: open_clip {model} has RANDOM weights (embed.pretrained=null): its embeddings carry "
                    f"no meaning and the clusters will be meaningless. Use it for tests only; pass a local "
                    f"weights file with embed.pretrained=/path/to/weights.pt")
    elif _looks_like_path(pretrained):
        if not Path(pretrained).is_file():
            raise MissingInput(f"embed.pretrained={pretrained}: no such weights file; give the path of an "
                                    f"open_clip state dict (.pt/.bin/.safetensors) for {model}")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise BadInput(f"embed.pretrained={pretrained!r} is neither a file nor a hub tag of {model} "
                             f"(tags: {tags}); pass a local weights file path instead")
    try:
        created, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained is None or _looks_like_path(pretrained):
            raise Unusable(f"open_clip could not build {model} with embed.pretrained={pretrained}: {e}") from e
        raise Unusable(f"could not get open_clip weights {model}/{pretrained} from the hub ({e}). Hub "
                           f"weights cannot be downloaded on machines without internet: download them "
                           f"elsewhere and pass the local file, embed.pretrained=/path/to/weights.bin") from e
    return created, preprocess


# torchvision's ImageNet classifiers were trained on inputs normalised with these statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionEncoder:
    """The penultimate (pooled) features of a torchvision classifier, L2-normalised.

    The weights come from a local state-dict file only (``weights``): the same
    file torchvision would download, e.g. ``mobilenet_v2-b0353104.pth``. Grayscale
    images are copied into three channels, resized to ``image_size`` and
    normalised with ImageNet statistics, as the classifier saw in training.
    """

    name = "torchvision"

    def __init__(self, model: str = "mobilenet_v2", weights: str | None = None, image_size: int = 96,
                 device: str | None = "auto"):
        import torchvision

        if model not in torchvision.models.list_models(module=torchvision.models):
            raise BadInput(f"embed.model={model!r} is not a torchvision classification model; see "
                             f"torchvision.models.list_models(), e.g. mobilenet_v2, resnet18, resnet50")
        self.device = resolve_device(device, "embed.device")
        self.image_size = int(image_size)
        net = torchvision.models.get_model(model, weights=None)
        digest = None
        if weights is None:
            log.warning(f"embed: torchvision {model} has RANDOM weights (embed.weights=null): its embeddings "
                        f"carry no meaning and the clusters will be meaningless. Use it for tests only; pass "
                        f"a local state-dict file with embed.weights=/path/to/{model}.pth")
        else:
            digest = _state_digest(_load_state_dict(net, str(weights), model))
        _drop_classifier(net, model)
        self.net = net.to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            self.dim = int(self.net(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)).shape[1])
        # the weights' digest, not the file's path or bytes, says which weights made the embeddings
        self.spec = dict(encoder=self.name, model=model, image_size=self.image_size, weights_sha256=digest)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _to_nchw(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        features = self.net(((x - self.mean) / self.std).to(self.device))
        return F.normalize(features.float().flatten(1), dim=1).cpu().numpy()


def _state_digest(state: dict) -> str:
    """sha256 of a state dict's names and tensor bytes: the same weights give the same digest in any file."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)  # 1-d: scalars (BatchNorm counters) too
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_state_dict(net: torch.nn.Module, path: str, model: str) -> dict:
    """Load ``path`` (.pth/.pt state dict or .safetensors) into ``net`` exactly and return it; errors name embed.weights."""
    if not Path(path).is_file():
        raise MissingInput(f"embed.weights={path}: no such weights file; give the path of a torchvision "
                                f"{model} state dict (.pth/.pt/.safetensors), e.g. the file torchvision downloads "
                                f"into ~/.cache/torch/hub/checkpoints/ on a machine with internet")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint that wraps the weights
        net.load_state_dict(state, strict=True)
        return state
    except Exception as e:
        raise Unusable(f"embed.weights={path} does not hold {model}'s weights ({type(e).__name__}: "
                           f"{str(e)[:300]}); give a state dict saved from torchvision's {model}") from e


def _drop_classifier(net: torch.nn.Module, model: str) -> None:
    """Replace the last Linear layer of the head (``fc``, ``classifier`` or ``heads``) with an identity."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(net, attr, None)
        if isinstance(head, torch.nn.Linear):
            setattr(net, attr, torch.nn.Identity())
            return
        if isinstance(head, torch.nn.Sequential):
            linear = [i for i, m in enumerate(head) if isinstance(m, torch.nn.Linear)]
            if linear:
                head[linear[-1]] = torch.nn.Identity()
                return
    raise BadInput(f"embed.model={model!r}: found no final Linear layer in fc/classifier/heads/head to drop; "
                     f"use a classification model such as mobilenet_v2 or resnet50")


def _build_pixels(cfg, meta) -> PixelEncoder:
    log.info("embed: 'pixels' encoder (downsampled pixels: needs no pretrained weights); for clusters by "
             "meaning use embed=torchvision with a local embed.weights file (`make weights` fetches MobileNetV2) "
             "or embed=open_clip with a local embed.pretrained file")
    return PixelEncoder(channels=meta.channels, size=cfg.get("size", 16), dim=cfg.get("dim"),
                        seed=cfg.get("seed", 0))


def _build_open_clip(cfg, meta) -> OpenClipEncoder:
    return OpenClipEncoder(model=cfg.get("model", "ViT-B-32"), pretrained=cfg.get("pretrained"),
                           image_size=cfg.get("image_size"), device=cfg.get("device", "auto"))


def _build_torchvision(cfg, meta) -> TorchvisionEncoder:
    return TorchvisionEncoder(model=cfg.get("model", "mobilenet_v2"), weights=cfg.get("weights"),
                              image_size=cfg.get("image_size") or 96, device=cfg.get("device", "auto"))


ENCODERS: dict[str, Callable] = {"pixels": _build_pixels, "open_clip": _build_open_clip,
                                 "torchvision": _build_torchvision}


def build_encoder(cfg_embed, data_meta) -> Encoder:
    """The encoder named by ``cfg_embed.encoder``, for images described by ``data_meta`` (a SourceMeta)."""
    name = cfg_embed.encoder
    if name not in ENCODERS:
        raise BadInput(f"embed.encoder={name!r} is not a known encoder; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](cfg_embed, data_meta)
