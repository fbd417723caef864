"""The ``torchvision`` encoder: pooled features of a torchvision classifier, its weights from a local file."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddm.devices import resolve_device
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.images import batch_to_unit_range

log = logging.getLogger("ddm")

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

    def __init__(
        self, model: str = "mobilenet_v2", weights: str | None = None, image_size: int = 96, device: str | None = "auto"
    ):
        import torchvision

        if model not in torchvision.models.list_models(module=torchvision.models):
            raise BadInput(
                f"embed.model={model!r} is not a torchvision classification model; see "
                f"torchvision.models.list_models(), e.g. mobilenet_v2, resnet18, resnet50"
            )
        self.device = resolve_device(device, "embed.device")
        self.image_size = int(image_size)
        net = torchvision.models.get_model(model, weights=None)
        digest = None
        if weights is None:
            log.warning(
                f"embed: torchvision {model} has RANDOM weights (embed.weights=null): its embeddings "
                f"carry no meaning and the clusters will be meaningless. Use it for tests only; pass "
                f"a local state-dict file with embed.weights=/path/to/{model}.pth"
            )
        else:
            digest = _state_digest(_load_state_dict(net, str(weights), model))
        _drop_classifier(net, model)
        self.net = net.to(self.device).eval()
        self.prepare = ImagenetInput(self.image_size)
        with torch.no_grad():
            self.dim = int(self.net(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)).shape[1])
        # the weights' digest, not the file's path or bytes, says which weights made the embeddings
        self.spec = dict(encoder=self.name, model=model, image_size=self.image_size, weights_sha256=digest)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.encode(self.prepare(images))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> np.ndarray:
        """Rows of images that ``prepare`` made into the classifier's input."""
        features = self.net(x.to(self.device))
        return F.normalize(features.float().flatten(1), dim=1).cpu().numpy()


@dataclass(frozen=True)
class ImagenetInput:
    """uint8 images -> the classifier's float32 input [B, 3, size, size]: the CPU half (loader workers run it)."""

    size: int

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = batch_to_unit_range(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std


def _state_digest(state: dict) -> str:
    """sha256 of a state dict's names and tensor bytes: the same weights give the same digest in any file."""

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)  # 1-d: scalars (BatchNorm counters) too
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_state_dict(net: torch.nn.Module, path: str, model: str) -> dict:
    """Load ``path`` (.pth/.pt state dict or .safetensors) into ``net`` exactly and return it.

    Its errors name ``embed.weights``.
    """
    if not Path(path).is_file():
        raise MissingInput(
            f"embed.weights={path}: no such weights file; give the path of a torchvision "
            f"{model} state dict (.pth/.pt/.safetensors), e.g. the file torchvision downloads "
            f"into ~/.cache/torch/hub/checkpoints/ on a machine with internet"
        )
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
        raise Unusable(
            f"embed.weights={path} does not hold {model}'s weights ({type(e).__name__}: "
            f"{str(e)[:300]}); give a state dict saved from torchvision's {model}"
        ) from e


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
    raise BadInput(
        f"embed.model={model!r}: found no final Linear layer in fc/classifier/heads/head to drop; "
        f"use a classification model such as mobilenet_v2 or resnet50"
    )
