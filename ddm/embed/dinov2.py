"""The ``dinov2`` encoder: DINOv2 image features (timm's ViTs), the embedding the paper clusters its data with.

Weights come from a local file only, never a download: timm's own state dict
(``.safetensors``, ``.pth``, ``.bin``) or Meta's released checkpoint
(``dinov2_vits14_reg4_pretrain.pth`` ...), which timm's checkpoint filter
converts. DINOv2 was trained at 518 px; the position embeddings are resampled
once, on load, to the grid of ``image_size`` (224 by default, DINOv2's usual
evaluation size), so the network runs at a fixed size with no per-batch
interpolation.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddm.devices import autocast_dtype, resolve_device
from ddm.embed.torchvision_features import IMAGENET_MEAN, IMAGENET_STD, _state_digest
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.images import batch_to_unit_range

log = logging.getLogger("ddm")

PATCH = 14  # every DINOv2 ViT cuts images into 14 x 14 patches
POOLS = ("cls", "mean")


class DinoV2Encoder:
    """Final normed DINOv2 features of each image, pooled (``cls`` token or ``mean`` of patches), L2-normalised.

    Grayscale images are copied into three channels, resized to ``image_size``
    (bicubic, as DINOv2's own evaluation transforms) and normalised with
    ImageNet statistics. On CUDA the network runs under bf16 autocast; rows are
    float32 either way.
    """

    name = "dinov2"

    def __init__(
        self,
        model: str = "vit_small_patch14_reg4_dinov2",
        weights: str | None = None,
        pool: str = "cls",
        image_size: int = 224,
        device: str | None = "auto",
    ):
        import timm

        known = timm.list_models("*dinov2*")
        if model not in known:
            raise BadInput(f"embed.model={model!r} is not a DINOv2 model of timm; choose one of {', '.join(known)}")
        if pool not in POOLS:
            raise BadInput(f"embed.pool={pool!r} is not one of {', '.join(POOLS)}")
        self.image_size = _checked_size(image_size)
        self.pool = pool
        self.device = resolve_device(device, "embed.device")
        self.autocast = autocast_dtype("auto", self.device)
        if weights is not None and not Path(weights).is_file():
            raise MissingInput(
                f"embed.weights={weights}: no such weights file; give the path of a DINOv2 {model} state dict "
                f"(timm's .safetensors/.pth/.bin, or Meta's dinov2_vit*14*_pretrain.pth)"
            )
        # num_classes=0: no classifier head; img_size sets the position grid the weights are resampled to.
        # Weights to load need no random init first: built on the meta device, the network costs nothing
        # until the file's tensors take its place (a ViT-G's init alone takes a minute on a CPU).
        with torch.device("meta") if weights is not None else contextlib.nullcontext():
            net = timm.create_model(model, pretrained=False, num_classes=0, img_size=self.image_size)
        digest = None
        if weights is None:
            log.warning(
                f"embed: DINOv2 {model} has RANDOM weights (embed.weights=null): its embeddings carry no "
                f"meaning and the clusters will be meaningless. Use it for tests only; pass a local weights "
                f"file with embed.weights=/path/to/{model}.safetensors (or Meta's dinov2_*_pretrain.pth)"
            )
        else:
            _load_weights(net, str(weights), model)
            # the loaded network's digest: the same weights name the same embeddings, whichever file layout
            digest = _state_digest(net.state_dict())
        self.net = net.to(self.device).eval()
        self.dim = int(net.num_features)
        self.prefix_tokens = int(net.num_prefix_tokens)  # CLS, then any registers, then the patches
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.spec = dict(encoder=self.name, model=model, pool=pool, image_size=self.image_size, weights_sha256=digest)
        log.info(f"embed: DINOv2 {model}, {pool} pooling at {self.image_size} px, {self.dim} features")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = batch_to_unit_range(images).to(self.device)  # (B, C, H, W) in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        # bicubic overshoots a little at edges; clamping keeps the inputs inside what the network saw
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        x = (x - self.mean) / self.std
        cast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with cast:
            tokens = self.net.forward_features(x)  # (B, prefix + patches, dim), after the final norm
        if self.pool == "cls":
            features = tokens[:, 0]
        else:  # registers are scratch space, not image content: only the patch tokens are averaged
            features = tokens[:, self.prefix_tokens :].float().mean(dim=1)
        return F.normalize(features.float(), dim=1).cpu().numpy()


def _checked_size(image_size) -> int:
    size = int(image_size)
    if size <= 0 or size % PATCH:
        lower = max(PATCH, size // PATCH * PATCH)
        raise BadInput(
            f"embed.image_size={image_size} is not a positive multiple of {PATCH} (DINOv2's patch size): "
            f"use e.g. {lower} or {lower + PATCH} (224 is DINOv2's usual evaluation size)"
        )
    return size


def _read_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"the file holds a {type(state).__name__}, not a state dict")
    return state


def _load_weights(net: torch.nn.Module, path: str, model: str) -> None:
    """Load ``path`` into ``net`` (built on the meta device) exactly, in timm's or Meta's layout, position
    embeddings resampled to its grid, as float32 whatever the file stores.

    Its errors name ``embed.weights``.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        # the filter unwraps {"model"/"state_dict": ...}, converts Meta's layout (mask_token, registers,
        # SwiGLU names) and resamples pos_embed from the grid it was trained at to the network's
        state = checkpoint_filter_fn(_read_state(path), net)
        # assign: the file's tensors replace the meta-device placeholders (strict: every one of them)
        net.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            raise KeyError(f"no values for {left[:3]}")
        net.float()  # assigned tensors keep the file's dtype: a half-precision file would run in half on a CPU
    except Exception as e:
        detail = " ".join(str(e).split())[:300]  # torch's mismatch report spans many lines
        raise Unusable(
            f"embed.weights={path} does not hold {model}'s weights ({type(e).__name__}: {detail}); give "
            f"weights of the same size, with registers (reg4) exactly when embed.model has them"
        ) from e
