"""A folder of images: one subfolder per class, or a flat folder (unlabelled); ``<name>.txt`` is a caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddm.data.sources.base import PIL_MODES, Sample, Source, SourceMeta, check_split, config_channels, make_key
from ddm.data.sources.order import PERMUTED_SAMPLES, Order, in_seeded_order
from ddm.errors import BadInput, MissingInput
from ddm.settings import Data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(image path, label) in a fixed order, and the class names (None for a flat folder)."""
    if not root.exists():
        raise MissingInput(f"image folder {root} does not exist: set data.root=<folder of images>")
    if not root.is_dir():
        raise BadInput(f"data.root={root} is not a folder: point it at a folder of images")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    if class_dirs and loose:
        raise BadInput(
            f"{root} has both class subfolders ({', '.join(d.name for d in class_dirs[:3])}, ...) "
            f"and loose images ({loose[0].name}, ...): put every image in a class folder, "
            f"or use a flat folder with no subfolders"
        )
    if class_dirs:
        files = [(p, label) for label, d in enumerate(class_dirs) for p in _images_under(d)]
        names = [d.name for d in class_dirs]
    else:
        files, names = [(p, -1) for p in loose], None
    if not files:
        raise BadInput(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}: "
            f"put images there, or set data.root to the folder that has them"
        )
    return files, names


def _read_image(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(PIL_MODES[channels])).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read image {path} ({e}): delete or replace it") from e


def image_folder(cfg: Data, seed: int) -> Source:
    """The folder's images in a seeded random order; key ``i`` is the i-th file of the sorted listing.

    Only the file list is permuted (and held in memory); each image is read when its turn comes.
    """
    split = check_split(cfg.split)
    root = Path(cfg.root)
    files, class_names = _list_image_folder(root)
    channels = config_channels(cfg)

    def read(i: int) -> Sample:
        path, label = files[i]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        return Sample(make_key("folder", split, i), _read_image(path, channels), label, caption, str(path))

    meta = SourceMeta(
        image_size=None, channels=channels, num_classes=len(class_names) if class_names else 0, class_names=class_names
    )
    samples: Iterator[Sample] = in_seeded_order(len(files), read, seed)
    return Source("folder", split, meta, samples, Order(PERMUTED_SAMPLES, int(seed)))
