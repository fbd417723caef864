"""Dataset sources: where the ``prepare`` stage reads images from.

A source turns ``cfg.data`` into a :class:`Source`: its metadata and a lazy
iterator of :class:`Sample` (stable key, uint8 image, int label, optional
caption). ``open_source`` picks the source named by ``data.source`` and wraps
its samples so that every image has the size and channel count the manifest
will announce (``data.image_size``, ``data.channels``), resizing only when
``data.resize`` asks for it, and stops after ``data.limit`` samples.

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
- ``webdataset``: existing webdataset shards (``data.urls``: a brace pattern or
  a list of local paths, ``pipe:`` commands or URLs). Images are decoded to
  uint8; the label is ``cls`` when present (else -1), the caption ``txt``.

Keys are re-issued for every source as ``<prefix>-<split>-<index:08d>`` (the
index counts samples in reading order), so they are stable across reruns and
contain no dots, which webdataset would split on.
"""
from __future__ import annotations

import gzip
import io
import itertools
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x803  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x801  # unsigned bytes, 1 dimension (count)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PIL_MODES = {1: "L", 3: "RGB"}


class Sample(NamedTuple):
    key: str
    image: np.ndarray     # uint8, HxW (grayscale) or HxWx3 (RGB)
    label: int            # class index, -1 when unlabelled
    caption: str | None
    origin: str           # where it came from (file, shard#key): named in error messages


@dataclass(frozen=True)
class SourceMeta:
    """What the rest of the pipeline needs to know about the prepared images.

    The ``prepare`` stage writes these fields into ``data/manifest.json``; later
    stages read them back with ``SourceMeta.from_manifest(load_manifest(run.data))``.
    """
    image_size: int | None    # side of the square images (None: not known before reading)
    channels: int | None      # 1 (grayscale) or 3 (RGB)
    num_classes: int          # 0: unlabelled / unconditional
    class_names: list[str] | None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SourceMeta":
        return cls(image_size=manifest["image_size"], channels=manifest["channels"],
                   num_classes=manifest["num_classes"], class_names=manifest.get("class_names"))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    prefix: str                 # first part of every key, e.g. "fmnist"
    split: str
    meta: SourceMeta
    samples: Iterator[Sample]


def make_key(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:08d}"


def _check_split(split) -> str:
    split = str(split)
    # The split becomes part of every key; webdataset splits keys at dots.
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"data.split={split!r}: use letters, digits and underscores only "
                         f"(it becomes part of every sample key)")
    return split


# --------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes and check its magic number and length.

    IDX: a 4-byte big-endian magic (0x08 = uint8 in byte 3, the number of
    dimensions in byte 4), one 4-byte big-endian size per dimension, then the data.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut file ends early
        raise ValueError(f"{path} is not a readable gzip file ({e}); the file is corrupt or truncated: "
                         f"reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from e
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:x}"
        raise ValueError(f"{path}: IDX magic number {shown}, expected 0x{magic:x}; this is not the IDX file "
                         f"it is named as, or it is corrupt: reinstall it or point data.root at good copies")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path}: header announces shape {dims} ({math.prod(dims)} bytes) but the file holds "
                         f"{max(len(raw) - header, 0)} bytes of data; it is truncated or corrupt: reinstall it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path]:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"data.split={split!r}: Fashion-MNIST has the splits {sorted(FASHION_MNIST_FILES)}")
    paths = tuple(root / name for name in FASHION_MNIST_FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {root}: install Debian's dataset-fashion-mnist "
            f"(apt-get install -y dataset-fashion-mnist) or set data.root=<dir with the IDX .gz files>")
    return paths


def fashion_mnist(cfg) -> Source:
    split = _check_split(cfg.split)
    images_path, labels_path = _fashion_mnist_files(Path(cfg.root), split)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels: "
                         f"the files do not belong together; reinstall them")
    samples = (Sample(make_key("fmnist", split, i), images[i], int(labels[i]), None, f"{images_path}[{i}]")
               for i in range(len(images)))
    meta = SourceMeta(image_size=images.shape[1], channels=1, num_classes=10,
                      class_names=list(FASHION_MNIST_CLASSES))
    return Source("fmnist", split, meta, samples)


# --------------------------------------------------------------------- sklearn digits

def digits(cfg) -> Source:
    from sklearn.datasets import load_digits

    split = _check_split(cfg.split)
    if split != "train":
        raise ValueError(f"data.split={split!r}: the digits source has one split, 'train' (all 1797 images)")
    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap): stretch to 0..255.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    samples = (Sample(make_key("digits", split, i), images[i], int(bunch.target[i]), None, f"sklearn digits[{i}]")
               for i in range(len(images)))
    meta = SourceMeta(image_size=8, channels=1, num_classes=10, class_names=[str(d) for d in range(10)])
    return Source("digits", split, meta, samples)


# --------------------------------------------------------------------- a folder of images

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(image path, label) in a fixed order, and the class names (None for a flat folder)."""
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist: set data.root=<folder of images>")
    if not root.is_dir():
        raise NotADirectoryError(f"data.root={root} is not a folder: point it at a folder of images")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    if class_dirs and loose:
        raise ValueError(f"{root} has both class subfolders ({', '.join(d.name for d in class_dirs[:3])}, ...) "
                         f"and loose images ({loose[0].name}, ...): put every image in a class folder, "
                         f"or use a flat folder with no subfolders")
    if class_dirs:
        files = [(p, label) for label, d in enumerate(class_dirs) for p in _images_under(d)]
        names = [d.name for d in class_dirs]
    else:
        files, names = [(p, -1) for p in loose], None
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}: "
                         f"put images there, or set data.root to the folder that has them")
    return files, names


def _read_image(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(PIL_MODES[channels])).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path} ({e}): delete or replace it") from e


def image_folder(cfg) -> Source:
    split = _check_split(cfg.split)
    root = Path(cfg.root)
    files, class_names = _list_image_folder(root)
    channels = _channels(cfg)

    def samples() -> Iterator[Sample]:
        for i, (path, label) in enumerate(files):
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else None
            yield Sample(make_key("folder", split, i), _read_image(path, channels), label, caption, str(path))

    meta = SourceMeta(image_size=None, channels=channels,
                      num_classes=len(class_names) if class_names else 0, class_names=class_names)
    return Source("folder", split, meta, samples())


# --------------------------------------------------------------------- existing webdataset shards

WDS_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


def _url_list(urls) -> list[str]:
    """data.urls (one brace pattern or a list of them) -> the list of shard URLs."""
    from braceexpand import braceexpand

    if urls is None:
        raise ValueError("data.urls is not set: give the shards, e.g. data.urls='/data/shards/shard-{000000..000009}.tar'")
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    out = [u for pattern in patterns for u in braceexpand(pattern)]
    for url in out:
        # Remote URLs and pipe: commands fail inside webdataset; local files can be checked here.
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise FileNotFoundError(f"webdataset shard {url} (from data.urls) does not exist: fix data.urls")
    if not out:
        raise ValueError(f"data.urls={urls!r} names no shards")
    return out


def webdataset(cfg) -> Source:
    import webdataset as wds

    split = _check_split(cfg.split)
    urls = _url_list(cfg.urls)
    channels = _channels(cfg)

    def samples() -> Iterator[Sample]:
        # Ordered, unshuffled, one process: keys must follow the shards' order.
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False,
                                 nodesplitter=None, workersplitter=None)
        for i, raw in enumerate(dataset):
            origin = f"{raw.get('__url__', '?')}#{raw.get('__key__', '?')}"
            ext = next((e for e in WDS_IMAGE_EXTS if e in raw), None)
            if ext is None:
                raise ValueError(f"sample {origin} has no image (looked for .{', .'.join(WDS_IMAGE_EXTS)}): "
                                 f"every sample of data.urls needs one")
            try:
                with Image.open(io.BytesIO(raw[ext])) as im:
                    image = np.asarray(im.convert(PIL_MODES[channels])).copy()
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot decode the .{ext} image of {origin} ({e})") from e
            label = int(raw["cls"].decode().strip()) if "cls" in raw else -1
            caption = raw["txt"].decode() if "txt" in raw else None
            yield Sample(make_key("wds", split, i), image, label, caption, origin)

    meta = SourceMeta(image_size=None, channels=channels, num_classes=int(cfg.num_classes or 0), class_names=None)
    return Source("wds", split, meta, samples())


# --------------------------------------------------------------------- picking and checking a source

SOURCES: dict[str, Callable] = {
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "image_folder": image_folder,
    "webdataset": webdataset,
}


def _channels(cfg) -> int:
    channels = int(cfg.get("channels") or 3)
    if channels not in PIL_MODES:
        raise ValueError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
    return channels


def _resolve_meta(native: SourceMeta, cfg) -> SourceMeta:
    """Merge what the source knows with what the config asks for; refuse contradictions."""
    resize = cfg.get("resize")
    size = cfg.get("image_size")
    if resize is not None and size is not None and int(resize) != int(size):
        raise ValueError(f"data.resize={resize} but data.image_size={size}: the prepared images will be "
                         f"{resize}x{resize}, so set data.image_size={resize} as well")
    image_size = int(resize or size or native.image_size or 0)
    if image_size < 1:
        raise ValueError("data.image_size is not set: give the side of the (square) images, or data.resize=<side>")
    channels = int(cfg.get("channels") or native.channels or 3)
    if channels not in PIL_MODES:
        raise ValueError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")

    num_classes = native.num_classes
    asked = int(cfg.get("num_classes") or 0)
    if asked and num_classes and asked != num_classes:
        raise ValueError(f"data.num_classes={asked} but the source has {num_classes} classes "
                         f"({native.class_names}): set data.num_classes={num_classes} or 0")
    num_classes = num_classes or asked

    class_names = cfg.get("class_names")
    class_names = list(class_names) if class_names is not None else native.class_names
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"data.class_names has {len(class_names)} names for {num_classes} classes: "
                         f"give one name per class, or null")
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
    im = Image.fromarray(np.ascontiguousarray(image[top:top + crop, left:left + crop]))
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
            raise ValueError(f"{s.origin}: image is {w}x{h} but data.image_size={side} expects {side}x{side}; "
                             f"resize the images beforehand, or set data.resize=<side> (and data.image_size "
                             f"to the same) to resize every image while preparing")
        if meta.num_classes and not -1 <= s.label < meta.num_classes:
            raise ValueError(f"{s.origin}: label {s.label} is outside 0..{meta.num_classes - 1} "
                             f"(data.num_classes={meta.num_classes}); fix the labels or data.num_classes")
        yield s._replace(image=image)


def open_source(cfg_data) -> Source:
    """The source named by ``cfg_data.source``, with conformed images and ``cfg_data.limit`` applied.

    Opening checks what can be checked before reading (paths, split, config
    consistency) so that a bad config fails before anything is written; image
    problems surface while the samples are iterated.
    """
    name = cfg_data.source
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    source = SOURCES[name](cfg_data)
    meta = _resolve_meta(source.meta, cfg_data)
    limit = cfg_data.get("limit")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"data.limit={limit}: use a positive number of samples, or null for all")
    samples = itertools.islice(source.samples, int(limit)) if limit is not None else source.samples
    return Source(source.prefix, source.split, meta, conform(samples, meta, cfg_data.get("resize")))
