"""Reference statistics computed from images: ``eval.reference`` naming a folder instead of a statistics file.

The folder holds either images (``.png``, ``.jpg``, ``.jpeg``, found recursively,
read in sorted path order) or webdataset ``.tar`` shards: a ddm shard set (a
``manifest.json`` beside them, e.g. another run's ``data/``, read in its order)
or plain webdataset shards whose samples carry an image member (``key.png``,
``key.jpg``, ``key.jpeg``). Every image must have the same size (it is the
reference's image size, checked against the samples'); grayscale images are
repeated to RGB, as the Inception does with grayscale samples.

The Inception statistics (``mu``, ``sigma`` of the pool features and, when the
file gives them, ADM's spatial ``mu_s``, ``sigma_s``) are computed once, in
batches, with running sums in float64 (no [N, 2048] matrix is held), and cached
under ``eval.reference_cache`` by a checksum of the image set's bytes (each
file's sha256, with its path under the folder) and of the Inception file. A
later evaluation with the same images and the same Inception reads the cache.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ddm.data.shards import MANIFEST, iter_shard, load_manifest, shard_paths
from ddm.errors import BadInput, MissingInput
from ddm.eval.reference import CONFIG_KEY, IMAGES, ReferenceStats, check_image_size
from ddm.io import atomic_path, sha256_file, sha256_strings

log = logging.getLogger("ddm")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg")
IMAGE_FOLDER, SHARDS = "image_folder", "shards"
_DIGESTS: dict[tuple, str] = {}  # (files, sizes, mtimes) -> digest: one read of the bytes per process


class RunningGaussian:
    """Mean and unbiased covariance of rows given a batch at a time, in float64.

    Sums are taken around the first batch's mean, so large offsets do not cancel away the covariance.
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((len(self.shift), len(self.shift)))
        c = x - self.shift
        self.n += len(x)
        self.s1 += c.sum(axis=0)
        self.s2 += c.T @ c

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise BadInput(f"a covariance needs at least 2 images, got {self.n}")
        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (cov + cov.T) / 2


@dataclass(frozen=True)
class ImageSet:
    """The images of a reference folder: ``kind`` image_folder (``files`` are images) or shards (tar files)."""

    root: Path
    kind: str
    files: list[Path]

    def digest(self) -> str:
        """sha256 over each file's path under the folder and its bytes' sha256: the content of the image set."""
        stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files)
        if stamp not in _DIGESTS:
            _DIGESTS[stamp] = sha256_strings(
                [self.kind] + [f"{f.relative_to(self.root)} {sha256_file(f)}" for f in self.files]
            )
        return _DIGESTS[stamp]

    def images(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(where, uint8 [H, W, 3])`` of every image, in order; ``where`` names it in errors."""
        if self.kind == IMAGE_FOLDER:
            for f in self.files:
                yield str(f), _decode(f.read_bytes(), f)
            return
        for shard in self.files:
            for raw in iter_shard(str(shard)):
                ext = next((e for e in raw if e.rsplit(".", 1)[-1].lower() in SHARD_IMAGE_EXTS), None)
                if ext is not None:
                    where = f"{raw['key']}.{ext} of {shard}"
                    yield where, _decode(raw[ext], where)

    def first_size(self) -> tuple[int, int]:
        """(height, width) of the first image; a set with no image at all is refused."""
        for _, image in self.images():
            return image.shape[0], image.shape[1]
        raise BadInput(
            f"{CONFIG_KEY}={self.root}: its shards hold no image (png/jpg/jpeg members); a latent shard set has "
            "none: point it at the images' shard set (a run's data/) or a folder of images"
        )

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [B, H, W, 3] batches of every image; images of another size than the first are refused."""
        size, batch = None, []
        for where, image in self.images():
            if size is None:
                size = image.shape[:2]
            elif image.shape[:2] != size:
                raise BadInput(
                    f"{CONFIG_KEY}={self.root}: {where} is {image.shape[0]}x{image.shape[1]}, the images before it "
                    f"{size[0]}x{size[1]}: a reference's images must all have the samples' size; resize them first"
                )
            batch.append(image)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def _decode(data: bytes, where) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).copy()  # grayscale repeated to three channels
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"{CONFIG_KEY}: {where} is not a readable image ({type(e).__name__}: {e})") from None


def find_image_set(path: str | Path, key: str = CONFIG_KEY) -> ImageSet:
    """The images under folder ``path``: a ddm shard set, plain .tar shards, or image files (recursively)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingInput(
            f"{key}={root} is not a folder: point it at an .npz of statistics, a folder of images (png/jpg) "
            "or of webdataset .tar shards, or set it to null"
        )
    if (root / MANIFEST).is_file():  # a ddm shard set: its own order, and its shards only
        manifest = load_manifest(root)
        files = [Path(p) for p in shard_paths(root, manifest)]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise MissingInput(f"{key}={root}: shard {missing[0]} of its manifest is missing; remake the shard set")
        return ImageSet(root, SHARDS, files)
    shards = sorted(p for p in root.rglob("*.tar") if p.is_file())
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if shards and images:
        raise BadInput(
            f"{key}={root} holds both .tar shards ({len(shards)}) and image files ({len(images)}): point it at a "
            "folder of one kind"
        )
    if not shards and not images:
        raise BadInput(f"{key}={root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
    return ImageSet(root, SHARDS, shards) if shards else ImageSet(root, IMAGE_FOLDER, images)


def reference_from_images(
    path: str | Path,
    inception,
    cache_dir: str | Path,
    batch_size: int = 32,
    image_size: tuple[int, int] | None = None,
    what: str = "the samples",
    key: str = CONFIG_KEY,
) -> ReferenceStats:
    """The Inception statistics of the images under ``path``, from the cache or computed (then cached).

    ``inception`` is a loaded ``ddm.eval.inception.InceptionFeatures`` (on the device it runs on).
    ``image_size``: the samples' (height, width); a reference of another size is refused before anything is
    computed. The cache file holds ``mu``, ``sigma`` (and ``mu_s``, ``sigma_s`` when the Inception file
    gives ADM's spatial features), ``feature_space``, ``num_images``, ``image_size``, ``images_sha256`` and
    ``inception_sha256``.
    """
    images = find_image_set(path, key)
    if image_size is not None:
        check_image_size(images.root, images.first_size(), image_size, what, key)
    digest = images.digest()
    cache_file = Path(cache_dir).expanduser() / f"{sha256_strings([digest, inception.sha256])[:32]}.npz"
    cached = cache_file.is_file()
    if cached:
        arrays = _read_cache(cache_file, digest, inception.sha256)
    if not cached or arrays is None:
        arrays = _compute(images, inception, batch_size, digest)
        with atomic_path(cache_file) as tmp:
            np.savez(tmp, **arrays)
        cached = False
        log.info("evaluate: reference statistics of %d images of %s -> %s", arrays["num_images"], path, cache_file)
    return ReferenceStats(
        arrays["mu"],
        arrays["sigma"],
        images.root,
        digest,
        str(arrays["feature_space"]),
        kind=IMAGES,
        num_images=int(arrays["num_images"]),
        image_size=tuple(int(v) for v in arrays["image_size"]),
        mu_s=arrays.get("mu_s"),
        sigma_s=arrays.get("sigma_s"),
        extra=dict(source=images.kind, cache_file=str(cache_file), cached=cached),
    )


def _compute(images: ImageSet, inception, batch_size: int, digest: str) -> dict:
    pool, spatial = RunningGaussian(), RunningGaussian() if inception.has_spatial else None
    size = None
    for batch in images.batches(int(batch_size)):
        size = batch.shape[1:3]
        out = inception.outputs(batch, int(batch_size), spatial=spatial is not None)
        pool.update(out["features"])
        if spatial is not None:
            spatial.update(out["spatial"])
    if pool.n < 2:
        raise BadInput(f"{CONFIG_KEY}={images.root} holds {pool.n} image: statistics need at least 2")
    mu, sigma = pool.stats()
    arrays = dict(
        mu=mu,
        sigma=sigma,
        feature_space=np.str_(inception.space),
        num_images=np.int64(pool.n),
        image_size=np.asarray(size, np.int64),
        images_sha256=np.str_(digest),
        inception_sha256=np.str_(inception.sha256),
    )
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = spatial.stats()
    return arrays


def _read_cache(path: Path, digest: str, inception_sha: str) -> dict | None:
    """The cached arrays, or None when the file is unreadable or of other images (it is then computed again)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("evaluate: reference cache %s is unreadable (%s): computing it again", path, e)
        return None
    if str(arrays.get("images_sha256")) != digest or str(arrays.get("inception_sha256")) != inception_sha:
        return None
    return arrays
