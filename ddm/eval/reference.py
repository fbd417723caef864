"""Reference statistics: FID against a published (mu, sigma) instead of held-out images.

Papers report FID against fixed statistics of a data set in the FID Inception's
2048-d pool space: ADM's reference batches (``VIRTUAL_imagenet64_labeled.npz``:
``mu``, ``sigma``, plus ``arr_0`` images and spatial ``mu_s``/``sigma_s``, unused
here) and clean-fid's stats files (``mu``, ``sigma``). ``eval.reference`` names
such a file, or a folder of images or of webdataset shards whose statistics
``ddm.eval.reference_images`` computes once and caches; the evaluate stage then
also measures each strategy's FD against it in the Inception space that
``eval.inception_weights`` loads.

Statistics of another feature space would give a number that looks like FID and
is not, so a file is refused when its dimension is not the Inception pool's, its
sigma is not a symmetric square matrix, or it names (``feature_space``, a string
such as ``inception:7ff4a85c3a63``, as ``write_reference`` records) another network.
A reference of images of another size than the samples' is refused too
(``ReferenceStats.check_image_size``): the size comes from the images, from
``image_size`` (``write_reference``) or from the header of ADM's ``arr_0``.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddm.errors import BadInput, MissingInput
from ddm.eval.fid import gaussian_stats
from ddm.io import atomic_path, sha256_file

CONFIG_KEY = "eval.reference"
INCEPTION_DIM = 2048  # the FID Inception's pool3 features
SPATIAL_DIM = 17 * 17 * 7  # ADM's sFID features: mixed_6/conv, first 7 channels
SYMMETRY_TOL = 1e-6  # relative: float32 stats files are symmetric to rounding, another matrix is not
STATS_FILE, IMAGES = "stats_file", "images"  # the two kinds of reference


@dataclass(frozen=True)
class ReferenceStats:
    """A reference Gaussian (and, where known, its spatial one for sFID) and where it came from."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    path: Path
    sha256: str  # of the file, or (kind ``images``) of the image set's bytes
    feature_space: str | None  # as recorded in the file; None when it records none
    kind: str = STATS_FILE  # ``stats_file``: an .npz of statistics; ``images``: computed from a folder of images
    num_images: int | None = None  # None: the file does not say
    image_size: tuple[int, int] | None = None  # (height, width) of its images; None: the file does not say
    mu_s: np.ndarray | None = None  # spatial statistics (ADM's mu_s, sigma_s) when present
    sigma_s: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # kind ``images``: source, cache_file, cached

    def describe(self) -> dict:
        """metrics.json's record of the reference: ``{kind, file, sha256, feature_space, dim, num_images,
        image_size, spatial}`` (``spatial``: whether it holds sFID statistics), and for images also ``source``
        (image_folder | shards), ``cache_file`` and ``cached``."""
        return dict(
            kind=self.kind,
            file=str(self.path),
            sha256=self.sha256,
            feature_space=self.feature_space,
            dim=len(self.mu),
            num_images=self.num_images,
            image_size=None if self.image_size is None else list(self.image_size),
            spatial=self.mu_s is not None,
            **self.extra,
        )

    def fd(self, features: np.ndarray) -> float:
        """FD between the Gaussian fitted to ``features`` [N, D] and this reference."""
        return fd_to_gaussian(features, self.mu, self.sigma, lambda: self._roots["pool"])

    def sfd(self, spatial: np.ndarray) -> float | None:
        """sFID: FD between the Gaussian of ADM's spatial features [N, 2023] and this reference's; None without."""
        if self.mu_s is None:
            return None
        return fd_to_gaussian(spatial, self.mu_s, self.sigma_s, lambda: self._roots["spatial"])

    @functools.cached_property
    def _roots(self) -> _Roots:
        """Square roots of the reference covariances, each computed once (an eigh of 2048 x 2048 is seconds)."""
        return _Roots(self)

    def check_image_size(self, size: tuple[int, int], what: str, key: str = CONFIG_KEY) -> None:
        """Refuse this reference when its images are not ``size`` (``what``: the samples)."""
        check_image_size(self.path, self.image_size, size, what, key)


class _Roots(dict):
    def __init__(self, ref: ReferenceStats):
        super().__init__()
        self.ref = ref

    def __missing__(self, name: str) -> np.ndarray:
        self[name] = psd_sqrt(self.ref.sigma if name == "pool" else self.ref.sigma_s)
        return self[name]


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fd_to_gaussian(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, sigma_root) -> float:
    """FD between the Gaussian of ``features`` [N, D] and N(``mu``, ``sigma``), the same number as
    ``frechet_distance(*gaussian_stats(features), mu, sigma)`` at a fraction of the cost.

    ``tr((S S_ref)^(1/2))``: with fewer images than dimensions, ``S = C^T C / (N - 1)`` (``C`` the centred
    features) and the non-zero eigenvalues of ``S S_ref`` are those of the N x N matrix ``C S_ref C^T / (N - 1)``;
    otherwise those of ``R S R`` with ``R = sigma_root()``, the reference's root, computed once per reference.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != len(mu):
        raise BadInput(f"features must be [N, {len(mu)}] with N >= 2, got shape {x.shape}")
    m = x.mean(axis=0)
    c = x - m
    n1 = len(x) - 1
    if n1 < x.shape[1]:
        inner = c @ sigma @ c.T / n1
    else:
        root = sigma_root()
        inner = root @ (c.T @ c / n1) @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = m - mu
    fd = diff @ diff + (c * c).sum() / n1 + np.trace(sigma) - 2 * np.sqrt(np.clip(w, 0, None)).sum()
    return float(max(fd, 0.0))


def check_image_size(path, image_size, size, what: str, key: str = CONFIG_KEY) -> None:
    """Refuse a reference (at ``path``) of ``image_size`` images when the samples (``what``) are ``size``:
    Inception sees both resized to 299 px, but from other pixels, so the number would not be FID at the samples'
    resolution. An unknown size (None: a stats file that does not record it) is let through."""
    if image_size is not None and tuple(image_size) != tuple(size):
        h, w = image_size
        raise BadInput(
            f"{key}={path} holds {h}x{w} images but {what} are {size[0]}x{size[1]}: FID against it would "
            f"compare another image size; pass the reference of {size[0]}x{size[1]} images (e.g. ADM's "
            f"VIRTUAL_imagenet{size[0]}_labeled.npz) or a folder of images of that size"
        )


def load_reference(path: str | Path, space: str, dim: int = INCEPTION_DIM, key: str = CONFIG_KEY) -> ReferenceStats:
    """Read ``mu``/``sigma`` from ``path`` and check they belong to feature space ``space`` of ``dim`` dimensions.

    ``mu_s``/``sigma_s`` (ADM's spatial statistics) are read too when present and of ADM's shape. The image
    size and count come from ``image_size``/``num_images`` (``write_reference``) or from ADM's ``arr_0``
    images (its header only: the images are not read). Every refusal is one line naming the file and what does
    not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(
            f"{key}={path} does not exist: point it at an .npz with `mu` and `sigma`, a folder of images or "
            "of .tar shards, or set it to null"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if not {"mu", "sigma"} <= names:
                raise BadInput(f"{key}={path} holds {sorted(names)}, not `mu` and `sigma`: pass a statistics file")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            recorded = str(f["feature_space"]) if "feature_space" in names else None
            spatial = [np.asarray(f[n], np.float64) for n in ("mu_s", "sigma_s")] if "sigma_s" in names else None
            size = tuple(int(v) for v in f["image_size"]) if "image_size" in names else None
            count = int(f["num_images"]) if "num_images" in names else None
        if "arr_0" in names:  # ADM's reference batch: [N, H, W, 3] images beside the statistics
            shape = _npy_shape(path, "arr_0")
            if len(shape) == 4:
                count, size = shape[0], (shape[1], shape[2])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{key}={path} is not a readable .npz ({e}): pass a statistics file") from e
    _check_gaussian(path, mu, sigma, dim, space, key)
    if recorded is not None and recorded != space:
        raise BadInput(f"{key}={path} was recorded in feature space {recorded}, not {space} (eval.inception_weights)")
    if spatial is not None and (spatial[0].shape != (SPATIAL_DIM,) or spatial[1].shape != (SPATIAL_DIM,) * 2):
        spatial = None  # spatial statistics of another layout: no sFID against them, the FID is still right
    return ReferenceStats(
        mu,
        sigma,
        path,
        sha256_file(path),
        recorded,
        kind=STATS_FILE,
        num_images=count,
        image_size=size,
        mu_s=None if spatial is None else spatial[0],
        sigma_s=None if spatial is None else spatial[1],
    )


def _check_gaussian(path, mu: np.ndarray, sigma: np.ndarray, dim: int, space: str, key: str) -> None:
    if mu.ndim != 1 or len(mu) != dim:
        raise BadInput(
            f"{key}={path}: mu has dim {mu.shape[0] if mu.ndim == 1 else mu.shape}, not the {dim} of {space}: "
            "these are statistics of another feature space"
        )
    if sigma.shape != (dim, dim):
        raise BadInput(f"{key}={path}: sigma is {sigma.shape}, not square {dim} x {dim} like its mu")
    scale = max(float(np.abs(sigma).max()), 1e-30)
    if float(np.abs(sigma - sigma.T).max()) > SYMMETRY_TOL * scale:
        raise BadInput(f"{key}={path}: sigma is not symmetric, so it is not a covariance matrix")


def _npy_shape(path: Path, name: str) -> tuple[int, ...]:
    """The shape of array ``name`` of an .npz, from its header only."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(int(v) for v in shape)


def write_reference(
    path: str | Path,
    features: np.ndarray,
    space: str,
    spatial: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
) -> Path:
    """Save the Gaussian of ``features`` [N, D] with its ``feature_space``: a file ``load_reference`` accepts.

    ``spatial`` [N, 2023]: also ``mu_s``/``sigma_s`` (sFID); ``image_size``: the (height, width) of the images.
    """
    mu, sigma = gaussian_stats(features)
    arrays = dict(mu=mu, sigma=sigma, feature_space=np.str_(space), num_images=np.int64(len(features)))
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = gaussian_stats(spatial)
    if image_size is not None:
        arrays["image_size"] = np.asarray(image_size, np.int64)
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


__all__ = [
    "CONFIG_KEY",
    "IMAGES",
    "INCEPTION_DIM",
    "SPATIAL_DIM",
    "STATS_FILE",
    "ReferenceStats",
    "check_image_size",
    "fd_to_gaussian",
    "load_reference",
    "write_reference",
]
