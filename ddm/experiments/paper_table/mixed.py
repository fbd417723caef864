"""The mixed-kind ensemble: a clustered DDM whose experts regress different targets (velocity, eps, x0).

``paper.mixed_targets`` lists one target per expert, e.g. ``[velocity, eps, x0, velocity]``:
K = its length. At the largest budget the table then trains one more configuration,
``mixed-targets-k<K>``: the experts of the clustered K-expert DDM retrained on the same
clusters, with the same seeds, batch, steps and network, each with its own
``expert.target``. The sampler converts every prediction to the path's velocity
(``ddm.models.prediction``), so the same router (the clustered run's, linked, not
trained again) and the same sampler serve it; its row costs the same training FLOPs.

Experts that regress eps or x0 train (and are guarded) on t in
``[paper.mixed_t_eps, 1 - paper.mixed_t_eps]``: an eps prediction is divided by alpha
(0 at t = 1), an x0 prediction by sigma (0 at t = 0) when turned into a velocity.
"""

from __future__ import annotations

import math

from ddm.errors import BadInput
from ddm.flow import PREDICTIONS
from ddm.settings import Settings

VELOCITY = "velocity"


def mixed_targets(cfg: Settings) -> tuple[str, ...]:
    """``paper.mixed_targets`` checked: () when absent or empty, else one known target per expert."""
    p = cfg.paper  # a plain mapping
    targets = tuple(str(t) for t in (p.get("mixed_targets") or ()))
    if not targets:
        return ()
    unknown = sorted({t for t in targets if t not in PREDICTIONS})
    if unknown:
        raise BadInput(f"paper.mixed_targets: {unknown} are not among the expert targets {PREDICTIONS}")
    if len(set(targets)) < 2:
        raise BadInput(
            f"paper.mixed_targets={list(targets)} has one target only: list at least two kinds "
            "(one kind is the clustered DDM itself), or [] for no mixed row"
        )
    ks = [int(k) for k in p["ks"]]
    if len(targets) not in ks:
        raise BadInput(
            f"paper.mixed_targets has {len(targets)} targets, one per expert, but paper.ks={ks} has no clustered "
            f"DDM with K={len(targets)}: its clusters and router are the ones the mixed experts share"
        )
    t_eps = float(p.get("mixed_t_eps", 5e-3))
    if not (math.isfinite(t_eps) and 0 < t_eps < 0.5):
        raise BadInput(f"paper.mixed_t_eps={t_eps} must be in (0, 0.5): the t range is [t_eps, 1 - t_eps]")
    return targets


def mixed_name(targets: tuple[str, ...]) -> str:
    """The configuration's name: ``mixed-targets-k4``."""
    return f"mixed-targets-k{len(targets)}"


def expert_overrides(cfg: Settings, config, k: int) -> dict:
    """The dotted overrides of expert ``k``'s job: its id, and in a mixed configuration its target (and t range)."""
    out = {"expert.id": k}
    if config.targets:
        target = config.targets[k]
        out["expert.target"] = target
        if target != VELOCITY:
            out["flow.t_eps"] = float(cfg.paper.get("mixed_t_eps", 5e-3))
    return out


def describe_targets(config) -> str:
    """``0: velocity, 1: eps, ...``: each expert's target."""
    return ", ".join(f"{k}: {t}" for k, t in enumerate(config.targets))
