"""The cluster router's arithmetic: the class composition p(k | y), the per-cluster score over centroids, and the
temperature that the clustering's own spread gives."""

from __future__ import annotations

import numpy as np
import torch

from ddm.errors import BadInput


def cluster_scores(scores: torch.Tensor, log_member: torch.Tensor) -> torch.Tensor:
    """Per cluster, ``logsumexp`` over its centroids of ``scores`` [B, M] plus ``log_member`` [K, M]: [B, K]."""
    return (scores[:, None, :] + log_member.to(scores)[None]).logsumexp(dim=-1)


def class_composition(class_counts, sizes) -> torch.Tensor:
    """``p(k | c)`` [C + 1, K] in float64: row c the share of class c's images in each cluster, the last row
    the prior (cluster sizes over the total); a class without images gets the prior too."""
    sizes = torch.as_tensor(np.asarray(sizes, dtype=np.float64))
    prior = sizes / sizes.sum()
    if class_counts is None or np.size(class_counts) == 0:
        return prior[None]
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if counts.dim() != 2 or counts.shape[1] != len(sizes) or bool((counts < 0).any()):
        raise BadInput(f"class counts of shape {tuple(counts.shape)} must be [classes, {len(sizes)}], non-negative")
    total = counts.sum(1, keepdim=True)
    rows = torch.where(total > 0, counts / total.clamp_min(1), prior[None])
    return torch.cat([rows, prior[None]])


def report_temperature(report: dict, dim: int) -> float:
    """``2 * inertia / dim``: the tau of isotropic Gaussians around the centroids with the clustering's spread.

    ``inertia`` is the mean squared distance of an image to its centroid (the fine one of a two-stage
    clustering: ``fine_inertia``), so ``inertia / dim`` is the variance per dimension.
    """
    inertia = report.get("fine_inertia") or report.get("inertia")
    if not inertia or inertia <= 0:
        raise BadInput(
            "clusters/report.json records no positive inertia to set the cluster router's tau from: "
            "give sample.route_tau (or fit it with ddm.cluster_router.fit_temperature)"
        )
    return 2.0 * float(inertia) / int(dim)


def host(a) -> torch.Tensor:
    """An array, list or tensor (on any device) as a host tensor."""
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
