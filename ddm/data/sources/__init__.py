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

Keys are re-issued for every source as ``<prefix>-<split>-<index:08d>``, so they
contain no dots, which webdataset would split on. The index is the sample's place
in the source's own listing (array index, sorted file list), so a key names the
same image whatever the seed; for ``webdataset`` it counts samples in reading
order (which follows the seed).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ddm.data.sources.base import Sample, Source, SourceMeta, conform, make_key, resize_square, resolve_meta
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
)
from ddm.data.sources.image_folder import IMAGE_SUFFIXES, image_folder
from ddm.data.sources.order import PERMUTED_SAMPLES, PERMUTED_SHARDS, Order
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
    "Order",
    "PIL_MODES",
    "SOURCES",
    "Sample",
    "Skipped",
    "Source",
    "SourceMeta",
    "UnreadableImage",
    "conform",
    "decode_image",
    "make_key",
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
    """The source named by ``cfg_data.source`` in the order the run's ``seed`` gives, conformed, with ``limit``.

    ``cfg_data.classes`` keeps only the samples of those class ids (labels keep
    their ids, so a run on some classes can later grow by the others with
    ``ddm extend``). ``cfg_data.limit`` then keeps the first samples of that
    order: a random subset of an indexed source rather than, say, the first
    classes of a sorted folder.
    Opening checks what can be checked before reading (paths, split, config
    consistency) so that a bad config fails before anything is written; image
    problems surface while the samples are iterated.
    """
    name = cfg_data.source
    if name not in SOURCES:
        raise BadInput(f"data.source={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    check_on_error(cfg_data.on_error)  # refused before anything is read, whichever source uses them
    check_background(cfg_data.background)
    source = SOURCES[name](cfg_data, int(seed))
    meta = resolve_meta(source.meta, cfg_data)
    limit = cfg_data.limit
    if limit is not None and int(limit) < 1:
        raise BadInput(f"data.limit={limit}: use a positive number of samples, or null for all")
    samples = only_classes(source.samples, cfg_data.classes, meta)
    samples = itertools.islice(samples, int(limit)) if limit is not None else samples
    samples = conform(samples, meta, cfg_data.resize)
    return Source(source.prefix, source.split, meta, samples, source.order, source.skipped, source.not_images)


def only_classes(samples, classes, meta: SourceMeta):
    """The samples whose label is one of ``classes`` (``data.classes``); all of them when it is null."""
    if classes is None:
        return samples
    wanted = {int(c) for c in classes}
    if not wanted:
        raise BadInput("data.classes=[] keeps no sample: list the class ids to keep, or null for all")
    if not meta.num_classes:
        raise BadInput("data.classes needs labelled data, but this source has no classes: leave data.classes=null")
    bad = sorted(c for c in wanted if not 0 <= c < meta.num_classes)
    if bad:
        raise BadInput(
            f"data.classes has ids {bad} outside the source's {meta.num_classes} classes (0..{meta.num_classes - 1})"
        )
    return (sample for sample in samples if sample.label in wanted)
