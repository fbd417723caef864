"""A folder of images: one subfolder per class, or a flat folder (unlabelled); ``<name>.txt`` is a caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ddm.data.sources.base import Indexed, Sample, SourceMeta, check_split, config_channels, named_key
from ddm.data.sources.decode import UnreadableImage, check_background, decode_with_format
from ddm.errors import BadInput, MissingInput
from ddm.settings import Data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _files_in(folder: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """The images (by extension, sorted) and the other files in ``folder``; hidden files are neither."""
    images, others = [], []
    for p in folder.rglob("*") if recursive else folder.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    return sorted(images), others


def _list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None, int]:
    """(image path, label) in a fixed order, the class names (None for a flat folder), and how many
    files are not images (by extension) and not the caption of one either: they are not read."""
    if not root.exists():
        raise MissingInput(f"image folder {root} does not exist: set data.root=<folder of images>")
    if not root.is_dir():
        raise BadInput(f"data.root={root} is not a folder: point it at a folder of images")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose, others = _files_in(root, recursive=False)
    if class_dirs and loose:
        raise BadInput(
            f"{root} has both class subfolders ({', '.join(d.name for d in class_dirs[:3])}, ...) "
            f"and loose images ({loose[0].name}, ...): put every image in a class folder, "
            f"or use a flat folder with no subfolders"
        )
    if class_dirs:
        files = []
        for label, d in enumerate(class_dirs):
            images, other = _files_in(d, recursive=True)
            files += [(p, label) for p in images]
            others += other
        names = [d.name for d in class_dirs]
    else:
        files, names = [(p, -1) for p in loose], None
    if not files:
        raise BadInput(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}: "
            f"put images there, or set data.root to the folder that has them"
        )
    captions = {p.with_suffix(".txt") for p, _ in files}
    return files, names, sum(1 for p in others if p not in captions)


def _caption(path: Path) -> str | None:
    caption_file = path.with_suffix(".txt")
    if not caption_file.is_file():
        return None
    try:
        return caption_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadInput(f"caption {caption_file} is not UTF-8 text ({e}): save it as UTF-8, or remove it") from e


class _FolderReader:
    """Reads a unit of an image folder, ``[(relative path, label), ...]``; picklable."""

    def __init__(self, root: Path, split: str, channels: int, background: tuple[int, int, int]):
        self.root, self.split, self.channels, self.background = root, split, channels, background

    def __call__(self, unit, skipped) -> Iterator[Sample]:
        for relative, label in unit:
            path = self.root / relative
            try:
                image, plain = decode_with_format(path, self.channels, self.background)
            except UnreadableImage as e:
                skipped.handle(e)  # raises unless data.on_error=skip
                continue
            key = named_key("folder", self.split, relative)
            stored = (plain, path.read_bytes()) if plain else None  # read again only to pass the file through
            yield Sample(key, image, label, _caption(path), str(path), stored, dict(file=relative))


def image_folder(cfg: Data, seed: int) -> Indexed:
    """The folder's images; an image's key is its path relative to ``data.root``, so it names the same image
    whatever the seed and whatever files are added beside it.

    Only the file list is held in memory (and permuted); each image is read when its unit is.
    """
    split = check_split(cfg.split)
    root = Path(cfg.root)
    files, class_names, not_images = _list_image_folder(root)
    reader = _FolderReader(root, split, config_channels(cfg), check_background(cfg.background))
    relative = [p.relative_to(root).as_posix() for p, _ in files]
    labels = np.array([label for _, label in files], dtype=np.int64)

    def unit(positions: np.ndarray) -> list[tuple[str, int]]:
        return [(relative[i], int(labels[i])) for i in positions]

    meta = SourceMeta(
        image_size=None,
        channels=reader.channels,
        num_classes=len(class_names) if class_names else 0,
        class_names=class_names,
    )
    return Indexed("folder", split, meta, labels, unit, reader, not_images)
