"""Evaluation metrics: plain functions on arrays and modules, usable without a run directory or a config.

- ``fid``: Fréchet distance between Gaussians fitted to two feature sets.
- ``prdc``: k-NN precision and recall (Kynkäänniemi et al. 2019).
- ``quality``: FD, precision/recall, class accuracy and per-class figures of
  generated images against real ones, in any feature space.
- ``feature_net``: a small classifier trained (and cached) on the training split;
  its penultimate features are the default feature space (no download needed).
- ``inception``: the standard FID Inception, from a local file only.
- ``fm_loss``: held-out flow-matching loss of any ``model(x, t, y)`` at fixed t and noise.
- ``router_diag``: router accuracy, entropy and calibration per bucket of t.
- ``flops``: measured forward FLOPs, training FLOPs, sampling FLOPs per image.
- ``heldout``: a shard set (held-out or training images) read into arrays.
- ``tables``: the evaluate stage's ``report.md`` from its metrics.

The ``evaluate`` stage (``ddm.stages.evaluate``, with what it reads from a run
in ``ddm.eval.run``) runs all of them on a run.
"""

from ddm.eval.fid import frechet_distance, frechet_distance_features, gaussian_stats
from ddm.eval.fm_loss import heldout_fm_loss
from ddm.eval.prdc import precision_recall
from ddm.eval.quality import sample_quality
from ddm.eval.router_diag import router_diagnostics

__all__ = [
    "frechet_distance",
    "frechet_distance_features",
    "gaussian_stats",
    "heldout_fm_loss",
    "precision_recall",
    "router_diagnostics",
    "sample_quality",
]
