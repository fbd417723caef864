"""Fitting the cluster router's temperature on denoised estimates of a few held-out images per cluster."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from ddm.cluster_router.likelihood import cluster_scores, host
from ddm.errors import BadInput
from ddm.flow import FlowPath

# Held-out images per cluster that fitting tau reads: the most any job reads from another island's partition.
CALIBRATION_PER_CLUSTER = 32


def fit_temperature(
    embeddings, clusters, centroids, centroid_cluster=None, log_prior=None, separable_nll: float | None = None
) -> float:
    """The tau minimising the mean NLL of each embedding's true cluster under the router's likelihood.

    ``embeddings`` [N, D] with their true ``clusters`` [N]; ``centroids`` [M, D] and ``centroid_cluster``
    [M] (None: one centroid per cluster) as ``ClusterRouter`` takes them; ``log_prior`` [K] added to the
    logits (None: a uniform prior, right for a held-out set with as many images of every cluster).
    Raises ``BadInput`` when the NLL keeps falling as tau goes to 0 (every embedding is nearest to its own
    cluster: clean images of the run are, by the clustering's rule) or to infinity (the embeddings say
    nothing about the cluster). ``separable_nll``: when the NLL keeps falling as tau goes to 0, return instead the
    largest tau whose NLL is at most this (the softest temperature that still classifies the data this well).
    """
    nll, sq = _nll_of(embeddings, clusters, centroids, centroid_cluster, log_prior)
    positive = sq[sq > 0]
    scale = float(positive.median()) if len(positive) else 1.0
    grid = np.linspace(math.log(scale) - 16.0, math.log(scale) + 8.0, 49)  # steps of 0.5 in log tau
    values = [nll(g) for g in grid]
    best = int(np.argmin(values))
    if best == 0 and separable_nll is not None:
        return _softest_below(nll, grid, float(separable_nll))
    if best == 0:
        raise BadInput(
            "fit_temperature: the NLL keeps falling as tau goes to 0: every embedding is nearest to a centroid "
            "of its own cluster (clean images of the run are, by the clustering's rule); fit on the embeddings "
            "of denoised estimates (ddm.cluster_router.denoised_embeddings) instead"
        )
    if best == len(grid) - 1:
        raise BadInput(
            "fit_temperature: the NLL keeps falling as tau grows: these embeddings say nothing about their "
            "cluster (are they embedded with the run's encoder, and their clusters right?)"
        )
    lo, hi = grid[best - 1], grid[best + 1]
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(48):  # the bracket of width 1 in log tau shrinks below 1e-9
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def _softest_below(nll, grid, target: float) -> float:
    """The largest tau (bisected in log tau between grid points) whose NLL is at most ``target``."""
    below = [g for g in grid if nll(g) <= target]
    if not below:
        raise BadInput(f"fit_temperature: no temperature classifies these embeddings with a mean NLL <= {target}")
    lo = max(below)
    hi = next((g for g in grid if g > lo), lo + 0.5)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if nll(mid) <= target else (lo, mid)
    return math.exp(lo)


def temperature_nll(embeddings, clusters, centroids, tau: float, centroid_cluster=None, log_prior=None) -> float:
    """The mean NLL of each embedding's true cluster under the router's likelihood at ``tau`` (what
    ``fit_temperature`` minimises; the arguments as there)."""
    nll, _ = _nll_of(embeddings, clusters, centroids, centroid_cluster, log_prior)
    return nll(math.log(float(tau)))


def _nll_of(embeddings, clusters, centroids, centroid_cluster, log_prior):
    """``(nll(log_tau), squared distances [N, M])`` of checked inputs."""
    e, c = host(embeddings).double(), host(centroids).double()
    y = host(clusters).long()
    owner = torch.arange(len(c)) if centroid_cluster is None else host(centroid_cluster).long()
    K = int(owner.max()) + 1
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1] or y.shape != (len(e),) or len(e) == 0:
        raise BadInput(
            f"fit_temperature needs embeddings [N, D], clusters [N] and centroids [M, D]; got "
            f"{tuple(e.shape)}, {tuple(y.shape)} and {tuple(c.shape)}"
        )
    if int(y.min()) < 0 or int(y.max()) >= K:
        raise BadInput(f"cluster ids must be in 0..{K - 1} (the clusters of the centroids)")
    sq = torch.cdist(e, c).pow(2)
    per_cluster = torch.bincount(owner, minlength=K).double()
    member = nn.functional.one_hot(owner.long(), K).T.bool()
    log_member = torch.where(member, -per_cluster.log()[:, None], torch.tensor(-math.inf, dtype=torch.float64))
    prior = torch.zeros(K, dtype=torch.float64) if log_prior is None else host(log_prior).double()

    def nll(log_tau: float) -> float:
        logits = cluster_scores(-sq / math.exp(log_tau), log_member) + prior
        return float((logits.logsumexp(1) - logits.gather(1, y[:, None]).squeeze(1)).mean())

    return nll, sq


@torch.no_grad()
def denoised_embeddings(model, path: FlowPath, x0: torch.Tensor, t, embed: Callable, y=None, generator=None):
    """Embeddings [N, D] of the x0 estimates of images ``x0`` (model space) noised to times ``t`` and denoised by
    ``model`` (the ensemble; ``model(x, t, y) -> v``): what the router embeds while sampling, to fit tau on."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    t = t.expand(len(x0)) if t.dim() == 0 else t
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = path.interpolate(x0, eps, t)
    v = model(x_t, t, y)
    return torch.as_tensor(embed(path.x0_from_velocity(x_t, v.to(x_t.dtype), t)))
