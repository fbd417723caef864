"""What every source yields (``Sample``, ``SourceMeta``, ``Source``), and making samples fit the manifest."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from ddm.data.sources.decode import PIL_MODES, Skipped
from ddm.data.sources.order import Order
from ddm.errors import BadInput
from ddm.settings import Data


class Sample(NamedTuple):
    key: str
    image: np.ndarray  # uint8, HxW (grayscale) or HxWx3 (RGB)
    label: int  # class index, -1 when unlabelled
    caption: str | None
    origin: str  # where it came from (file, shard#key): named in error messages


@dataclass(frozen=True)
class SourceMeta:
    """What the rest of the pipeline needs to know about the prepared images.

    The ``prepare`` stage writes these fields into ``data/manifest.json``; later
    stages read them back with ``SourceMeta.from_manifest(load_manifest(run.data))``.
    """

    image_size: int | None  # side of the square images (None: not known before reading)
    channels: int | None  # 1 (grayscale) or 3 (RGB)
    num_classes: int  # 0: unlabelled / unconditional
    class_names: list[str] | None

    @classmethod
    def from_manifest(cls, manifest: dict) -> SourceMeta:
        return cls(
            image_size=manifest["image_size"],
            channels=manifest["channels"],
            num_classes=manifest["num_classes"],
            class_names=manifest.get("class_names"),
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    prefix: str  # first part of every key, e.g. "fmnist"
    split: str
    meta: SourceMeta
    samples: Iterator[Sample]  # in ``order``: lazily decoded, one at a time
    order: Order  # how ``samples`` were permuted (see ddm.data.sources.order)
    # unreadable images left out under data.on_error=skip: filled while ``samples`` is iterated
    skipped: Skipped = field(default_factory=lambda: Skipped("raise"))
    not_images: int = 0  # files beside the images that were not read, not being images by their extension


def make_key(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:08d}"


def check_split(split) -> str:
    split = str(split)
    # The split becomes part of every key; webdataset splits keys at dots.
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise BadInput(
            f"data.split={split!r}: use letters, digits and underscores only (it becomes part of every sample key)"
        )
    return split


def config_channels(cfg: Data) -> int:
    channels = int(cfg.channels or 3)
    if channels not in PIL_MODES:
        raise BadInput(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
    return channels


def resolve_meta(native: SourceMeta, cfg: Data) -> SourceMeta:
    """Merge what the source knows with what the config asks for; refuse contradictions."""
    resize = cfg.resize
    size = cfg.image_size
    if resize is not None and size is not None and int(resize) != int(size):
        raise BadInput(
            f"data.resize={resize} but data.image_size={size}: the prepared images will be "
            f"{resize}x{resize}, so set data.image_size={resize} as well"
        )
    image_size = int(resize or size or native.image_size or 0)
    if image_size < 1:
        raise BadInput("data.image_size is not set: give the side of the (square) images, or data.resize=<side>")
    channels = int(cfg.channels or native.channels or 3)
    if channels not in PIL_MODES:
        raise BadInput(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")

    num_classes = native.num_classes
    asked = int(cfg.num_classes or 0)
    if asked and num_classes and asked != num_classes:
        raise BadInput(
            f"data.num_classes={asked} but the source has {num_classes} classes "
            f"({native.class_names}): set data.num_classes={num_classes} or 0"
        )
    num_classes = num_classes or asked

    class_names = cfg.class_names
    class_names = list(class_names) if class_names is not None else native.class_names
    if class_names is not None and len(class_names) != num_classes:
        raise BadInput(
            f"data.class_names has {len(class_names)} names for {num_classes} classes: give one name per class, or null"
        )
    return SourceMeta(image_size, channels, num_classes, [str(c) for c in class_names] if class_names else None)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 2 and channels == 3:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if (image.ndim == 3) != (channels == 3) or (image.ndim == 3 and image.shape[2] != 3):
        return np.asarray(Image.fromarray(image).convert(PIL_MODES[channels]))
    return image


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """Centre-crop to a square (keeping the aspect ratio of the content), then resize to side x side."""
    h, w = image.shape[:2]
    crop = min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    im = Image.fromarray(np.ascontiguousarray(image[top : top + crop, left : left + crop]))
    return np.asarray(im.resize((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0))


def conform(samples: Iterable[Sample], meta: SourceMeta, resize: int | None) -> Iterator[Sample]:
    """Give every image the manifest's channels and size, and check labels fit num_classes.

    Without ``resize`` a differently sized image is an error (naming it): silently
    rescaling a dataset of mixed sizes would hide a mistake in the data.
    """
    side = meta.image_size
    for s in samples:
        image = _to_channels(np.asarray(s.image, dtype=np.uint8), meta.channels)
        if resize:
            if image.shape[:2] != (side, side):
                image = resize_square(image, side)
        elif image.shape[:2] != (side, side):
            h, w = image.shape[:2]
            raise BadInput(
                f"{s.origin}: image is {w}x{h} but data.image_size={side} expects {side}x{side}; "
                f"resize the images beforehand, or set data.resize=<side> (and data.image_size "
                f"to the same) to resize every image while preparing"
            )
        if meta.num_classes and not -1 <= s.label < meta.num_classes:
            raise BadInput(
                f"{s.origin}: label {s.label} is outside 0..{meta.num_classes - 1} "
                f"(data.num_classes={meta.num_classes}); fix the labels or data.num_classes"
            )
        yield s._replace(image=image)
