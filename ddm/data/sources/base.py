"""What every source yields (``Sample``, ``SourceMeta``, ``Source``), and making samples fit the manifest."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple
from urllib.parse import quote

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
    # the source's own bytes and format ("jpeg", "png") when ``image`` is exactly what they decode to
    # with no conversion (passed through untouched when no resize is needed); None otherwise
    plain: tuple[str, bytes] | None = None
    meta: dict | None = None  # provenance stored beside the sample (file, url, the source's own json)


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


@dataclass(frozen=True)
class UnitReader:
    """Reads one unit's samples, fitted to the manifest; picklable, and small (it holds no unit)."""

    read: Callable[[object, Skipped], Iterator[Sample]]  # the source's own reader: decoded samples in order
    meta: SourceMeta  # resolved: the size, channels and classes the manifest announces
    resize: int | None = None  # data.resize: centre-crop and resize to meta.image_size
    classes: frozenset[int] | None = None  # keep only these labels (streamed sources know them only when reading)
    on_error: str = "raise"

    def __call__(self, unit, skipped: Skipped) -> Iterator[tuple[Sample, bool]]:
        """The unit's samples that pass ``classes``, fitted to ``meta``: ``(sample, changed)``, where
        ``changed`` says the pixels differ from what the source's bytes decode to (resized, converted)."""
        for sample in self.read(unit, skipped):
            if self.classes is not None and sample.label not in self.classes:
                continue
            yield conform_one(sample, self.meta, self.resize)


@dataclass
class Source:
    """A dataset opened for reading: what it is, and the work of reading it split into units.

    ``units`` are in stored order; unit ``i`` becomes ``data/shard-<i>.tar`` (an empty unit, every image of
    which was skipped or filtered out, becomes no shard). ``reader(unit, skipped)`` yields the unit's samples
    in order, handing unreadable images to ``skipped``. Units and the reader are picklable (paths and indices,
    never open files or decoded images), so worker processes and jobs on other machines read units
    independently, and the shards come out the same whoever reads them.
    """

    prefix: str  # first part of every key, e.g. "fmnist"
    split: str
    order: Order  # how the units were permuted (see ddm.data.sources.order)
    units: list
    reader: UnitReader
    not_images: int = 0  # files beside the images that were not read, not being images by their extension
    limit: int | None = None  # stop after this many samples, across units in order (streamed sources)

    @property
    def meta(self) -> SourceMeta:
        return self.reader.meta

    @property
    def samples(self) -> Iterator[Sample]:
        """Every sample in stored order, decoded in this process (for small reads: a held-out split)."""
        skipped = Skipped(self.reader.on_error)
        stream = (s for unit in self.units for s, _ in self.reader(unit, skipped))
        return itertools.islice(stream, self.limit) if self.limit is not None else stream


@dataclass
class Indexed:
    """What a source whose items are known before reading (an array, a file list) gives ``open_source``.

    ``labels[i]`` is item ``i``'s label (-1: none), so ``data.classes`` and ``data.limit`` are applied
    to the index, and the units are chunks of a permutation of it; ``unit(positions)`` makes a unit of
    the items at those positions, small and picklable, that ``read`` reads.
    """

    prefix: str
    split: str
    native: SourceMeta  # what the source itself knows of its images
    labels: np.ndarray
    unit: Callable[[np.ndarray], object]
    read: Callable[[object, Skipped], Iterator[Sample]]
    not_images: int = 0


@dataclass
class Streamed:
    """What a source that can only be streamed (existing shards) gives ``open_source``: its units are
    its input shards, each read whole; labels are known only when read."""

    prefix: str
    split: str
    native: SourceMeta
    units: list
    read: Callable[[object, Skipped], Iterator[Sample]]


def make_key(prefix: str, split: str, index: int) -> str:
    """The key of item ``index`` of a source whose items are numbered (an array): ``fmnist-train-00000042``."""
    return f"{prefix}-{split}-{index:08d}"


def escape_name(name: str) -> str:
    """``name`` (a relative path, a shard's key) as a key part: percent-encoded, with ``.`` and ``/`` encoded
    too (webdataset splits keys on them), so two names never give one key and ``unquote`` gives it back."""
    return quote(name, safe="-_~").replace(".", "%2E")


def named_key(prefix: str, split: str, name: str) -> str:
    """The key of an item the source names (a file's relative path, a shard and key): stable whatever the seed,
    the number of workers or the files added beside it, e.g. ``folder-train-cats%2F0001%2Ejpg``."""
    return f"{prefix}-{split}-{escape_name(name)}"


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


def conform_one(sample: Sample, meta: SourceMeta, resize: int | None) -> tuple[Sample, bool]:
    """``sample`` with the manifest's channels and size and a checked label; and whether its pixels changed.

    Without ``resize`` a differently sized image is an error (naming it): silently
    rescaling a dataset of mixed sizes would hide a mistake in the data.
    """
    side = meta.image_size
    image = np.asarray(sample.image, dtype=np.uint8)
    fitted = _to_channels(image, meta.channels)
    if resize:
        if fitted.shape[:2] != (side, side):
            fitted = resize_square(fitted, side)
    elif fitted.shape[:2] != (side, side):
        h, w = fitted.shape[:2]
        raise BadInput(
            f"{sample.origin}: image is {w}x{h} but data.image_size={side} expects {side}x{side}; "
            f"resize the images beforehand, or set data.resize=<side> (and data.image_size "
            f"to the same) to resize every image while preparing"
        )
    if meta.num_classes and not -1 <= sample.label < meta.num_classes:
        raise BadInput(
            f"{sample.origin}: label {sample.label} is outside 0..{meta.num_classes - 1} "
            f"(data.num_classes={meta.num_classes}); fix the labels or data.num_classes"
        )
    if meta.num_classes and sample.label < 0:
        # A class-conditional expert would look this label up in its embedding table: on a GPU
        # that is a device-side assert hours into training. Refuse it here, naming the sample.
        raise BadInput(
            f"{sample.origin} has no label (-1) but the data has {meta.num_classes} classes: "
            f"label every sample, or set data.num_classes=0 to train unconditional experts"
        )
    return sample._replace(image=fitted), fitted is not image


def conform(samples: Iterable[Sample], meta: SourceMeta, resize: int | None) -> Iterator[Sample]:
    """``conform_one`` over a stream of samples."""
    for s in samples:
        yield conform_one(s, meta, resize)[0]
