"""The cluster router's fitted temperature on disk (``router/route_tau.json`` of ``ddm fit-route-tau``): what it was
fitted for, and reading it back for ``sample.route_tau=fitted`` only while that still holds."""

from __future__ import annotations

import math

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.sampling.checkpoints import models_identity

FITTED = "fitted"  # sample.route_tau=fitted


def tau_identity(rd: RunDir) -> dict:
    """``{clustering_id, experts: {expert-KK: sha256}}``: a tau fitted for these is the run's until they change."""
    return dict(
        clustering_id=read_json(rd.cluster_report)["clustering_id"] if rd.cluster_report.exists() else None,
        experts={k: v for k, v in models_identity(rd).items() if k.startswith("expert-")},
    )


def fitted_tau(rd: RunDir) -> float:
    """The tau of ``router/route_tau.json``, refused when it was fitted for another clustering or other experts."""
    if not rd.route_tau.exists():
        raise MissingInput(
            f"sample.route_tau=fitted reads {rd.route_tau}, which does not exist: run `ddm fit-route-tau` first "
            f"(or sample.route_tau=null for the clustering's own)"
        )
    record = read_json(rd.route_tau)
    was, now = record.get("settings") or {}, tau_identity(rd)
    if was.get("clustering_id") != now["clustering_id"] or was.get("experts") != now["experts"]:
        raise BadInput(
            f"{rd.route_tau} was fitted for clustering {was.get('clustering_id')} and experts "
            f"{sorted((was.get('experts') or {}).items())}, not the run's now ({now['clustering_id']}, "
            f"{sorted(now['experts'].items())}): run `ddm fit-route-tau redo=true`"
        )
    try:
        value = float(record["tau"])
    except (KeyError, TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadInput(f"{rd.route_tau} holds no positive tau: run `ddm fit-route-tau redo=true`")
    return value
