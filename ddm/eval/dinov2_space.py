"""DINOv2's feature space for sample quality (Stein et al. 2023, "Exposing flaws of generative model evaluation
metrics"): FD, precision and recall on DINOv2 ViT features instead of Inception's.

``eval.dinov2_weights`` names a local timm DINOv2 file (timm's state dict or
Meta's checkpoint), loaded by ``ddm.embed.dinov2`` (never a download); the
network is ``eval.dinov2_model`` (Stein et al. use ViT-L/14,
``vit_large_patch14_dinov2``). As in their code, images are resized to 224 px
with bicubic interpolation and normalised with ImageNet's mean and std, and the
feature is the final normed CLS token, *not* L2-normalised (the clustering
embedding of ``ddm.embed`` is), in float32. The space is named
``dinov2:<sha256 of the file, 12 hex>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddm.errors import MissingInput, UserError
from ddm.images import batch_to_unit_range
from ddm.io import sha256_file

CONFIG_KEY = "eval.dinov2_weights"
MODEL_KEY = "eval.dinov2_model"
SIZE = 224  # Stein et al.'s input size


@dataclass
class DinoV2Features:
    """A loaded DINOv2 and the name of its feature space; call it on uint8 images for [N, D] float64 features."""

    net: torch.nn.Module
    model: str
    sha256: str
    path: Path
    device: torch.device
    image_size: int = SIZE

    @property
    def space(self) -> str:
        return f"dinov2:{self.sha256[:12]}"

    @property
    def dim(self) -> int:
        return int(self.net.num_features)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        mean = torch.tensor((0.485, 0.456, 0.406), device=self.device).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), device=self.device).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(images), batch_size):
            x = batch_to_unit_range(images[i : i + batch_size]).to(self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
            tokens = self.net.forward_features((x - mean) / std)  # final normed tokens, CLS first
            out.append(tokens[:, 0].float().cpu())
        return torch.cat(out).double().numpy()


def load_dinov2(path, model: str, device=None, image_size: int = SIZE) -> DinoV2Features:
    """The DINOv2 ``model`` with the weights of ``path`` (loaded by ``ddm.embed.dinov2``), on ``device``."""
    from ddm.embed.dinov2 import DinoV2Encoder  # timm: only when asked for

    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise MissingInput(
            f"{CONFIG_KEY}={path}: no such file; point it at a local timm DINOv2 state dict (.safetensors/.pth) or "
            f"Meta's dinov2_vit*14_pretrain.pth of {MODEL_KEY}={model}, or set {CONFIG_KEY}=null"
        )
    try:
        encoder = DinoV2Encoder(model=model, weights=str(path), pool="cls", image_size=image_size, device="cpu")
    except UserError as e:  # its errors name the embed stage's keys: name this stage's
        message = str(e).replace("embed.weights", CONFIG_KEY).replace("embed.model", MODEL_KEY)
        raise type(e)(message) from e
    device = torch.device(device or "cpu")
    return DinoV2Features(encoder.net.to(device).eval(), model, sha256_file(path), path, device, image_size)
