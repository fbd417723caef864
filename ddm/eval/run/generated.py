"""The generated images a strategy is evaluated on: the sample stage's, when they fit, else sampled here.

``samples/samples.npz`` stands for a strategy when the sample stage used that
strategy with the same sampling settings (``SAME_SAMPLING``) and made enough
images (made with ``sample.model=distilled``, it stands for ``distilled``).
Otherwise the evaluate stage samples ``eval.num_samples`` images itself and
keeps them as ``evaluation/samples-<strategy>.npz``.

Each result is a dict ``{images, labels, usage, usage_images, source}``: uint8
images, labels (-1: unconditional), the ensemble's merged usage records and the
number of images they cover, and the file the images came from (relative to the run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.ensemble import ROUTING_DEFAULTS
from ddm.io import atomic_path, load_npz, read_json
from ddm.routing_schedule import is_strategy, parse_strategy
from ddm.sampling.checkpoints import models_identity
from ddm.sampling.draw import draw
from ddm.sampling.record import SamplesRecord
from ddm.seeds import EVAL_LABELS_OFFSET, EVAL_NOISE_OFFSET, ROUTING_OFFSET

# Sampling settings that must match for samples/samples.npz to stand for a strategy.
SAME_SAMPLING = ("top_k", "experts", "temperature", "solver", "steps", "cfg_scale", "cfg_interval", "cfg_routing")
# ... and those of one strategy only.
STRATEGY_OPTION = {"threshold": "threshold", "nucleus": "top_p"}


def from_samples_stage(rd: RunDir, strategy: str, n: int, sampling: dict, seed: int) -> dict | None:
    """``n`` images of ``samples/`` when it was made with ``strategy`` and ``sampling``, else None."""
    npz_path = rd.samples / "samples.npz"
    if not (rd.samples_record.exists() and npz_path.exists()):
        return None
    record = SamplesRecord.read(rd.samples_record)
    if record.models != models_identity(rd):  # drawn from models retrained since
        return None
    # a record from before cfg_routing existed was made with what is now its default
    made = {**ROUTING_DEFAULTS, **record.settings}
    made_as = made.get("model") or made.get("strategy")  # the student, or the routing strategy of the ensemble
    pieces = parse_strategy(strategy).strategies if is_strategy(strategy) else (strategy,)
    keys = SAME_SAMPLING + tuple(k for s, k in STRATEGY_OPTION.items() if s in pieces)
    if made_as != strategy or any(made.get(k) != sampling.get(k) for k in keys):
        return None
    npz = load_npz(npz_path, ("images", "labels"))  # a damaged samples.npz names itself, not a numpy error
    if len(npz["images"]) < n:
        return None
    # A seeded subset, not the first n: the first images are the class-sorted grid.
    idx = np.sort(np.random.default_rng(seed + EVAL_LABELS_OFFSET).permutation(len(npz["images"]))[:n])
    usage_path = rd.samples / "usage.json"
    usage = read_json(usage_path) if usage_path.exists() else []
    usage = usage.get("records", []) if isinstance(usage, dict) else usage
    return dict(
        images=npz["images"][idx],
        labels=npz["labels"][idx],
        usage=usage,
        usage_images=record.num_images,
        source="samples/samples.npz",
    )


def labels_to_sample(real_labels: np.ndarray, num_classes: int, n: int, seed: int) -> torch.Tensor | None:
    """``n`` class labels in the held-out set's class proportions (uniform when it has none); None if unconditional.

    Matching proportions make per-class and overall figures compare like with like.
    """
    if num_classes == 0:
        return None
    rng = np.random.default_rng(seed + EVAL_LABELS_OFFSET)
    pool = real_labels[real_labels >= 0]
    return torch.from_numpy(np.resize(rng.permutation(pool), n) if len(pool) else rng.integers(num_classes, size=n))


def sample_now(
    ensemble,
    path,
    shape,
    labels: torch.Tensor | None,
    n: int,
    batch_size: int,
    sampling: dict,
    seed: int,
    device,
    target: Path,
    run_root: Path,
    decode=None,
    conditions=None,
) -> dict:
    """Sample ``n`` images from ``ensemble`` with the evaluation's own prior noise; save them to ``target``.

    ``decode``: a latent run's VAE decoder (the samples are latents), None for pixels.
    ``conditions``: what the networks are given in place of ``labels`` (a text run's encoded prompts);
    ``labels`` are still saved, for the per-class figures.
    """
    given = labels if conditions is None else conditions
    images, usage = draw(
        ensemble,
        path,
        shape,
        given,
        n,
        batch_size,
        sampling,
        seed + EVAL_NOISE_OFFSET,
        device,
        decode,
        routing_seed=seed + ROUTING_OFFSET,
    )
    label_array = np.full(n, -1, np.int64) if labels is None else labels.numpy()
    with atomic_path(target) as tmp:
        np.savez(tmp, images=images, labels=label_array)
    return dict(
        images=images, labels=label_array, usage=usage, usage_images=n, source=str(target.relative_to(run_root))
    )
