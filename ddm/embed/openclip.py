"""The ``open_clip`` encoder: an open_clip image tower, weights from a local file (or a hub tag online)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddm.devices import resolve_device
from ddm.embed.base import looks_like_path
from ddm.errors import BadInput, MissingInput, Unusable

log = logging.getLogger("ddm")


class OpenClipEncoder:
    """The image tower of an open_clip model; features are L2-normalised ``encode_image`` outputs."""

    name = "open_clip"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        image_size: int | None = None,
        device: str | None = "auto",
    ):
        import open_clip

        if model not in open_clip.list_models():
            raise BadInput(
                f"embed.model={model!r} is not an open_clip model; see open_clip.list_models(), "
                f"e.g. ViT-B-32, ViT-S-32-alt, RN50"
            )
        pretrained = str(pretrained) if pretrained else None
        self.device = resolve_device(device, "embed.device")
        kwargs = dict(force_image_size=int(image_size)) if image_size else {}
        self.model, self.preprocess = create_open_clip(open_clip, model, pretrained, kwargs)
        self.model.to(self.device).eval()
        self.prepare = ClipInput(self.preprocess)
        self.dim = int(open_clip.get_model_config(model)["embed_dim"])
        self.spec = dict(encoder=self.name, model=model, pretrained=pretrained, image_size=image_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.encode(self.prepare(images))

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        """Rows of images that ``prepare`` made into the model's input."""
        features = self.model.encode_image(batch.to(self.device))
        return F.normalize(features.float(), dim=1).cpu().numpy()


@dataclass(frozen=True)
class ClipInput:
    """uint8 images -> the model's input through its own eval transforms: the CPU half (loader workers run it)."""

    preprocess: Callable

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        # open_clip's transforms expect RGB PIL images; grayscale is copied into three channels.
        return torch.stack([self.preprocess(Image.fromarray(im).convert("RGB")) for im in images])


def create_open_clip(open_clip, model: str, pretrained: str | None, kwargs: dict, key: str = "embed"):
    """(model, eval preprocess) with weights from nowhere, a local file or the hub; clear errors for each.

    ``key`` is the config section that named the weights (``embed``, ``text``), for the messages.
    """
    if pretrained is None:
        log.warning(
            f"{key}: open_clip {model} has RANDOM weights ({key}.pretrained=null): its embeddings carry "
            f"no meaning. Use it for tests only; pass a local weights file with {key}.pretrained=/path/to/weights.pt"
        )
    elif looks_like_path(pretrained):
        if not Path(pretrained).is_file():
            raise MissingInput(
                f"{key}.pretrained={pretrained}: no such weights file; give the path of an "
                f"open_clip state dict (.pt/.bin/.safetensors) for {model}"
            )
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise BadInput(
                f"{key}.pretrained={pretrained!r} is neither a file nor a hub tag of {model} "
                f"(tags: {tags}); pass a local weights file path instead"
            )
    try:
        created, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained is None or looks_like_path(pretrained):
            raise Unusable(f"open_clip could not build {model} with {key}.pretrained={pretrained}: {e}") from e
        raise Unusable(
            f"could not get open_clip weights {model}/{pretrained} from the hub ({e}). Hub "
            f"weights cannot be downloaded on machines without internet: download them "
            f"elsewhere and pass the local file, {key}.pretrained=/path/to/weights.bin"
        ) from e
    return created, preprocess


# torchvision's ImageNet classifiers were trained on inputs normalised with these statistics.
