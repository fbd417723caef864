"""The built-in datasets: Fashion-MNIST from its gzipped IDX files, and scikit-learn's 8x8 digits."""

from __future__ import annotations

import abc
import gzip
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ddm.data.sources.base import Indexed, Sample, SourceMeta, check_split, make_key
from ddm.errors import BadInput, MissingInput
from ddm.settings import Data

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 0x803  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x801  # unsigned bytes, 1 dimension (count)


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
        raise BadInput(
            f"{path} is not a readable gzip file ({e}); the file is corrupt or truncated: "
            f"reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
        ) from e
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:x}"
        raise BadInput(
            f"{path}: IDX magic number {shown}, expected 0x{magic:x}; this is not the IDX file "
            f"it is named as, or it is corrupt: reinstall it or point data.root at good copies"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(dims):
        raise BadInput(
            f"{path}: header announces shape {dims} ({math.prod(dims)} bytes) but the file holds "
            f"{max(len(raw) - header, 0)} bytes of data; it is truncated or corrupt: reinstall it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path]:
    if split not in FASHION_MNIST_FILES:
        raise BadInput(f"data.split={split!r}: Fashion-MNIST has the splits {sorted(FASHION_MNIST_FILES)}")
    paths = tuple(root / name for name in FASHION_MNIST_FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingInput(
            f"Fashion-MNIST files {missing} not found in {root}: install Debian's dataset-fashion-mnist "
            f"(apt-get install -y dataset-fashion-mnist) or set data.root=<dir with the IDX .gz files>"
        )
    return paths


class _ArrayReader(abc.ABC):
    """Reads items of a numbered image array by index; picklable (loads its arrays in each process, once).

    A subclass says where the arrays come from (``arrays``) and its key prefix.
    """

    prefix = ""

    def __init__(self, split: str):
        self.split = split
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}  # each process loads the arrays itself

    @abc.abstractmethod
    def arrays(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(uint8 images, int labels, the name of where they were read from, for error messages)."""

    def __call__(self, unit, skipped) -> Iterator[Sample]:
        if self._arrays is None:
            self._arrays = self.arrays()
        images, labels, where = self._arrays
        for i in unit:
            i = int(i)
            yield Sample(make_key(self.prefix, self.split, i), images[i], int(labels[i]), None, f"{where}[{i}]")


class _FashionMnistReader(_ArrayReader):
    prefix = "fmnist"

    def __init__(self, split: str, images_path: Path, labels_path: Path):
        super().__init__(split)
        self.images_path, self.labels_path = images_path, labels_path

    def arrays(self):
        images = read_idx(self.images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(self.labels_path, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise BadInput(
                f"{self.images_path} holds {len(images)} images but {self.labels_path} {len(labels)} labels: "
                f"the files do not belong together; reinstall them"
            )
        return images, labels, str(self.images_path)


class _DigitsReader(_ArrayReader):
    prefix = "digits"

    def arrays(self):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap): stretch to 0..255.
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        return images, bunch.target, "sklearn digits"


def fashion_mnist(cfg: Data, seed: int) -> Indexed:
    """The IDX files' images; key ``i`` is image ``i`` of the file."""
    split = check_split(cfg.split)
    images_path, labels_path = _fashion_mnist_files(Path(cfg.root), split)
    reader = _FashionMnistReader(split, images_path, labels_path)
    _, labels, _ = reader._arrays = reader.arrays()  # checks the files now, before anything is written
    meta = SourceMeta(image_size=28, channels=1, num_classes=10, class_names=list(FASHION_MNIST_CLASSES))
    return Indexed("fmnist", split, meta, np.asarray(labels, dtype=np.int64), _indices, reader)


def digits(cfg: Data, seed: int) -> Indexed:
    """scikit-learn's digits; key ``i`` is image ``i`` of the set."""
    split = check_split(cfg.split)
    if split != "train":
        raise BadInput(f"data.split={split!r}: the digits source has one split, 'train' (all 1797 images)")
    reader = _DigitsReader(split)
    _, labels, _ = reader._arrays = reader.arrays()
    meta = SourceMeta(image_size=8, channels=1, num_classes=10, class_names=[str(d) for d in range(10)])
    return Indexed("digits", split, meta, np.asarray(labels, dtype=np.int64), _indices, reader)


def _indices(positions: np.ndarray) -> list[int]:
    """A unit of a numbered array: the indices themselves."""
    return [int(i) for i in positions]
