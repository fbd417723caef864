"""Dataset sources: where the ``prepare`` stage reads images from.

A source turns the ``data`` settings and the run's seed into a :class:`Source`: its
metadata, a lazy iterator of :class:`Sample` (stable key, uint8 image, int label,
optional caption) and the ``Order`` of that iterator. ``open_source`` picks the
source named by ``data.source`` and wraps its samples so that every image has
the size and channel count the manifest will announce (``data.image_size``,
``data.channels``), resizing only when ``data.resize`` asks for it, and stops
after ``data.limit`` samples.

Sources (``data.source``):

- ``fashion_mnist``: the four gzipped IDX files of Fashion-MNIST in
  ``data.root`` (Debian's ``dataset-fashion-mnist`` package puts them in
  /usr/share/datasets/fashion-mnist). Splits ``train`` (60000) and ``test``
  (10000); 28x28 grayscale, 10 classes.
- ``digits``: scikit-learn's bundled 8x8 digits, scaled from 0..16 to 0..255.
  There is one split, ``train``, holding all 1797 images (the set is only big
  enough for tests and demos; hold-out evaluation uses another dataset).
- ``image_folder``: ``data.root`` holds either one subfolder per class (labels
  follow the sorted subfolder names) or the images directly (label -1). A
  sibling ``<name>.txt`` next to an image is its caption.
- ``webdataset``: existing webdataset shards (``data.urls``: a folder of ``.tar``
  shards, a glob, a brace pattern, or a list of local paths, ``pipe:`` commands or
  URLs; a local file that is not a tar is refused by name). Images are decoded to
  uint8; the label is ``cls`` when present (else -1), the caption ``txt``.

Every source yields its samples in a seeded random order (``ddm.data.sources.order``):
a permutation of every sample, drawn over the index before anything is decoded,
or for ``webdataset`` a permutation of the input shards. ``Source.order`` says
which, and ``prepare`` records it in the manifest.

Decoding (``ddm.data.sources.decode.decode_image``) is the same for image folders and
webdataset shards: 16-bit grayscale is scaled to 8 bit by its bit depth, transparent
images are composited over ``data.background`` ([R, G, B]), and an image that cannot
be decoded (empty, truncated, not an image) stops ``prepare`` naming it, or with
``data.on_error=skip`` is left out and recorded in ``Source.skipped``, which
``prepare`` writes to ``data/skipped.json``. ``Source.not_images`` counts the files of
an image folder that were not read, not being images by their extension (captions aside).

Keys (``<prefix>-<split>-<name>``, never holding ``.`` or ``/``, which webdataset
splits on) come from the source, so a key names the same image whatever the seed,
the number of workers or jobs, or the files added beside it: an array's index
(``fmnist-train-00000042``), a file's path relative to ``data.root``, or an input
shard's name and the sample's own ``__key__``, percent-encoded (``escape_name``).
What the sample came from travels with it as ``key.json``: ``{"file": ...}``, or
``{"shard": url, "key": ..., "source": the input sample's json}``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ddm.data.sources.base import (
    Indexed,
    Sample,
    Source,
    SourceMeta,
    Streamed,
    UnitReader,
    conform,
    conform_one,
    escape_name,
    make_key,
    named_key,
    resize_square,
    resolve_meta,
)
from ddm.data.sources.builtin import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    digits,
    fashion_mnist,
    read_idx,
)
from ddm.data.sources.decode import (
    PIL_MODES,
    Skipped,
    UnreadableImage,
    check_background,
    check_on_error,
    decode_image,
    decode_with_format,
)
from ddm.data.sources.image_folder import IMAGE_SUFFIXES, image_folder
from ddm.data.sources.order import PERMUTED_SAMPLES, PERMUTED_SHARDS, Order, permutation
from ddm.data.sources.webdataset import webdataset
from ddm.errors import BadInput
from ddm.settings import Data

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_SUFFIXES",
    "PERMUTED_SAMPLES",
    "PERMUTED_SHARDS",
    "Indexed",
    "Order",
    "PIL_MODES",
    "SOURCES",
    "Sample",
    "Skipped",
    "Source",
    "SourceMeta",
    "Streamed",
    "UnitReader",
    "UnreadableImage",
    "conform",
    "conform_one",
    "decode_image",
    "decode_with_format",
    "escape_name",
    "make_key",
    "named_key",
    "open_source",
    "read_idx",
    "resize_square",
]

SOURCES: dict[str, Callable] = {
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "image_folder": image_folder,
    "webdataset": webdataset,
}


def open_source(cfg_data: Data, seed: int) -> Source:
    """The source named by ``cfg_data.source``, split into units in the order the run's ``seed`` gives.

    ``cfg_data.classes`` keeps only the samples of those class ids (labels keep
    their ids, so a run on some classes can later grow by the others with
    ``ddm extend``). ``cfg_data.limit`` then keeps the first samples of that
    order: a random subset of an indexed source rather than, say, the first
    classes of a sorted folder. For an indexed source both are applied to the
    index, before anything is decoded, and the permuted index is cut into units
    of ``data.shard_size``; a streamed source's units are its input shards in a
    permuted order, ``classes`` and ``limit`` applied as they are read.
    Opening checks what can be checked before reading (paths, split, config
    consistency) so that a bad config fails before anything is written; image
    problems surface while the units are read.
    """
    name = cfg_data.source
    if name not in SOURCES:
        raise BadInput(f"data.source={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    on_error = check_on_error(cfg_data.on_error)  # refused before anything is read, whichever source uses them
    check_background(cfg_data.background)
    listing = SOURCES[name](cfg_data, int(seed))
    meta = resolve_meta(listing.native, cfg_data)
    limit = cfg_data.limit
    if limit is not None and int(limit) < 1:
        raise BadInput(f"data.limit={limit}: use a positive number of samples, or null for all")
    classes = _classes(cfg_data.classes, meta)
    if isinstance(listing, Streamed):
        reader = UnitReader(listing.read, meta, cfg_data.resize, classes, on_error)
        units = [listing.units[i] for i in permutation(len(listing.units), seed)]
        limit = None if limit is None else int(limit)
        return Source(listing.prefix, listing.split, Order(PERMUTED_SHARDS, int(seed)), units, reader, limit=limit)
    positions = permutation(len(listing.labels), seed)
    if classes is not None:
        positions = positions[np.isin(listing.labels[positions], sorted(classes))]
    if limit is not None:
        positions = positions[: int(limit)]
    size = int(cfg_data.shard_size)
    if size < 1:
        raise BadInput(f"data.shard_size={size}: give at least 1 sample per shard")
    units = [listing.unit(positions[lo : lo + size]) for lo in range(0, len(positions), size)]
    reader = UnitReader(listing.read, meta, cfg_data.resize, None, on_error)  # classes: applied to the index
    order = Order(PERMUTED_SAMPLES, int(seed))
    return Source(listing.prefix, listing.split, order, units, reader, not_images=listing.not_images)


def _classes(classes, meta: SourceMeta) -> frozenset[int] | None:
    """``data.classes`` checked against the source's classes: the labels to keep, or None for all."""
    if classes is None:
        return None
    wanted = frozenset(int(c) for c in classes)
    if not wanted:
        raise BadInput("data.classes=[] keeps no sample: list the class ids to keep, or null for all")
    if not meta.num_classes:
        raise BadInput("data.classes needs labelled data, but this source has no classes: leave data.classes=null")
    bad = sorted(c for c in wanted if not 0 <= c < meta.num_classes)
    if bad:
        raise BadInput(
            f"data.classes has ids {bad} outside the source's {meta.num_classes} classes (0..{meta.num_classes - 1})"
        )
    return wanted
