"""Reference statistics: FID against a published (mu, sigma) instead of held-out images.

Papers report FID against fixed statistics of a data set in the FID Inception's
2048-d pool space: ADM's reference batches (``VIRTUAL_imagenet64_labeled.npz``:
``mu``, ``sigma``, plus ``arr_0`` images and spatial ``mu_s``/``sigma_s``, unused
here) and clean-fid's stats files (``mu``, ``sigma``). ``eval.reference`` names
such a file; the evaluate stage then also measures each strategy's FD against it
in the Inception space that ``eval.inception_weights`` loads.

Statistics of another feature space would give a number that looks like FID and
is not, so a file is refused when its dimension is not the Inception pool's, its
sigma is not a symmetric square matrix, or it names (``feature_space``, a string
such as ``inception:7ff4a85c3a63``, as ``write_reference`` records) another network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm.errors import BadInput, MissingInput
from ddm.eval.fid import frechet_distance, gaussian_stats
from ddm.io import atomic_path, sha256_file

CONFIG_KEY = "eval.reference"
INCEPTION_DIM = 2048  # the FID Inception's pool3 features
SYMMETRY_TOL = 1e-6  # relative: float32 stats files are symmetric to rounding, another matrix is not


@dataclass(frozen=True)
class ReferenceStats:
    """A reference Gaussian and where it came from."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    path: Path
    sha256: str
    feature_space: str | None  # as recorded in the file; None when it records none

    def describe(self) -> dict:
        """metrics.json's record of the reference: ``{file, sha256, feature_space, dim}``."""
        return dict(file=str(self.path), sha256=self.sha256, feature_space=self.feature_space, dim=len(self.mu))

    def fd(self, features: np.ndarray) -> float:
        """FD between the Gaussian fitted to ``features`` [N, D] and this reference."""
        return frechet_distance(*gaussian_stats(features), self.mu, self.sigma)


def load_reference(path: str | Path, space: str, dim: int = INCEPTION_DIM, key: str = CONFIG_KEY) -> ReferenceStats:
    """Read ``mu``/``sigma`` from ``path`` and check they belong to feature space ``space`` of ``dim`` dimensions.

    Every refusal is one line naming the file and what does not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(f"{key}={path} does not exist: point it at an .npz with `mu` and `sigma`, or set it to null")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if not {"mu", "sigma"} <= names:
                raise BadInput(f"{key}={path} holds {sorted(names)}, not `mu` and `sigma`: pass a statistics file")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            recorded = str(f["feature_space"]) if "feature_space" in names else None
    except (OSError, ValueError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{key}={path} is not a readable .npz ({e}): pass a statistics file") from e
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
    if recorded is not None and recorded != space:
        raise BadInput(f"{key}={path} was recorded in feature space {recorded}, not {space} (eval.inception_weights)")
    return ReferenceStats(mu, sigma, path, sha256_file(path), recorded)


def write_reference(path: str | Path, features: np.ndarray, space: str) -> Path:
    """Save the Gaussian of ``features`` [N, D] with its ``feature_space``: a file ``load_reference`` accepts."""
    mu, sigma = gaussian_stats(features)
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, feature_space=np.str_(space), num_images=np.int64(len(features)))
    return path
