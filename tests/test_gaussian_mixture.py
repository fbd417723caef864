"""Decentralized Flow Matching on a Gaussian mixture, where every flow is known in closed form.

The data is a mixture of K clusters, each itself a mixture of isotropic Gaussians.
For one component N(mu, s0^2 I) the noised x_t = a x0 + s eps is N(a mu, (a^2 s0^2 + s^2) I) and

    E[x0 | x_t]  = mu + a s0^2 / (a^2 s0^2 + s^2) (x_t - a mu)
    E[eps | x_t] = s / (a^2 s0^2 + s^2) (x_t - a mu)
    v = a' E[x0 | x_t] + s' E[eps | x_t]

Mixing these with the component posteriors gives each cluster's exact flow v_k
(a perfect expert), the exact router log p(k | x_t) and the global flow computed
from all components at once. The ensemble identity sum_k p(k|x_t) v_k = v must hold.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble, experts_per_sample
from ddm.flow import FlowPath
from ddm.models.prediction import PredictionToVelocity
from ddm.sampling import sample

D = 2
# cluster -> list of (mean, std, weight within cluster); clusters well apart, components overlapping.
CLUSTERS = [
    [((-3.0, 0.0), 0.5, 0.5), ((-2.0, 1.0), 0.3, 0.3), ((-3.0, 1.5), 0.4, 0.2)],
    [((3.0, 0.5), 0.4, 0.6), ((2.5, -0.5), 0.6, 0.4)],
    [((0.0, -3.0), 0.3, 0.3), ((1.0, -3.5), 0.5, 0.3), ((-0.5, -3.5), 0.4, 0.4)],
]
CLUSTER_WEIGHTS = (0.5, 0.3, 0.2)


class MixtureFlow(nn.Module):
    """Exact marginal velocity of a mixture of isotropic Gaussians under a FlowPath."""

    num_classes = 0

    def __init__(self, path: FlowPath, components):
        super().__init__()
        self.path = path
        self.register_buffer("mu", torch.tensor([c[0] for c in components], dtype=torch.float64))
        self.register_buffer("s0", torch.tensor([c[1] for c in components], dtype=torch.float64))
        w = torch.tensor([c[2] for c in components], dtype=torch.float64)
        self.register_buffer("log_w", w.log())
        self.calls = 0

    def log_joint(self, x, t):
        """log w_c + log N(x; a mu_c, var_c I) for every component: [B, C]."""
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        var = a**2 * self.s0[None] ** 2 + s**2
        diff = x[:, None, :] - a[..., None] * self.mu[None]
        sq = (diff**2).sum(-1)
        return self.log_w[None] - 0.5 * sq / var - 0.5 * D * torch.log(2 * math.pi * var)

    def posterior_means(self, x, t):
        """E[x0 | x_t] and E[eps | x_t] under this mixture, each [B, D]."""
        a, s = self.path.alpha(t)[:, None, None], self.path.sigma(t)[:, None, None]
        s0sq = self.s0[None, :, None] ** 2
        var = a**2 * s0sq + s**2
        diff = x[:, None, :] - a * self.mu[None]
        e_x0 = self.mu[None] + a * s0sq / var * diff  # [B, C, D]
        e_eps = s / var * diff
        post = self.log_joint(x, t).softmax(dim=-1)[..., None]  # p(component | x_t, cluster)
        return (post * e_x0).sum(1), (post * e_eps).sum(1)

    def forward(self, x, t, y=None):
        self.calls += 1
        e_x0, e_eps = self.posterior_means(x, t)
        return self.path.d_alpha(t)[:, None] * e_x0 + self.path.d_sigma(t)[:, None] * e_eps


class MixturePrediction(MixtureFlow):
    """The same cluster as an expert trained on another target: it emits E[eps | x_t] or E[x0 | x_t]."""

    def __init__(self, path: FlowPath, components, kind: str):
        super().__init__(path, components)
        self.kind = kind

    def forward(self, x, t, y=None):
        self.calls += 1
        e_x0, e_eps = self.posterior_means(x, t)
        return e_eps if self.kind == "eps" else e_x0


class MixtureRouter(nn.Module):
    """Exact log p(k | x_t, t) up to a constant: log pi_k + logsumexp over cluster k's components."""

    def __init__(self, clusters: list[MixtureFlow], cluster_weights):
        super().__init__()
        self.clusters = nn.ModuleList(clusters)
        self.num_outputs = len(clusters)
        self.register_buffer("log_pi", torch.tensor(cluster_weights, dtype=torch.float64).log())

    def forward(self, x, t, y=None):
        return torch.stack([c.log_joint(x, t).logsumexp(-1) for c in self.clusters], dim=1) + self.log_pi


def build(schedule: str, strategy: str = "full", **routing):
    path = FlowPath(schedule)
    experts = [MixtureFlow(path, comps) for comps in CLUSTERS]
    router = MixtureRouter([MixtureFlow(path, comps) for comps in CLUSTERS], CLUSTER_WEIGHTS)
    everything = [(m, s, pi * w) for pi, comps in zip(CLUSTER_WEIGHTS, CLUSTERS) for m, s, w in comps]
    return path, Ensemble(experts, router, strategy=strategy, **routing), MixtureFlow(path, everything), router


def build_mixed(schedule: str):
    """The ensemble of ``build`` with its experts in three parameterisations: velocity, eps and x0."""
    path = FlowPath(schedule)
    kinds = ("velocity", "eps", "x0")
    experts = [
        MixtureFlow(path, comps)
        if kind == "velocity"
        else PredictionToVelocity(MixturePrediction(path, comps, kind), kind, path)
        for kind, comps in zip(kinds, CLUSTERS)
    ]
    router = MixtureRouter([MixtureFlow(path, comps) for comps in CLUSTERS], CLUSTER_WEIGHTS)
    everything = [(m, s, pi * w) for pi, comps in zip(CLUSTER_WEIGHTS, CLUSTERS) for m, s, w in comps]
    return path, Ensemble(experts, router, strategy="full"), MixtureFlow(path, everything)


def mixture_moments():
    """Mean and covariance of the data distribution, exactly."""
    mean, second = torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    for pi, comps in zip(CLUSTER_WEIGHTS, CLUSTERS):
        for m, s, w in comps:
            mu = torch.tensor(m, dtype=torch.float64)
            mean += pi * w * mu
            second += pi * w * (torch.outer(mu, mu) + s**2 * torch.eye(D, dtype=torch.float64))
    return mean, second - torch.outer(mean, mean)


TIMES = [0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 1 - 1e-6, 1.0]


@pytest.mark.parametrize(
    "strategy,routing",
    [("full", {}), ("nucleus", dict(top_p=1.0)), ("threshold", dict(threshold=0.0))],
    ids=["full", "nucleus-top_p-1", "threshold-0"],
)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_full_ensemble_equals_global_marginal_flow(schedule, strategy, routing):
    """The exact posterior over every expert: ``full``, and the nucleus of all the mass (top_p = 1)."""
    path, ensemble, global_flow, _ = build(schedule, strategy, **routing)
    g = torch.Generator().manual_seed(0)
    for t in TIMES:
        # points along the noised data at this t plus broad ones, so every cluster is in play
        x = 4.0 * torch.randn(512, D, generator=g, dtype=torch.float64)
        tt = torch.full((512,), t, dtype=torch.float64)
        torch.testing.assert_close(
            ensemble(x, tt),
            global_flow(x, tt),
            rtol=1e-9,
            atol=1e-9,
            msg=f"{strategy} ensemble != global flow at t={t} ({schedule})",
        )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_full_ensemble_of_mixed_parameterisations_equals_global_marginal_flow(schedule):
    """Experts predicting the velocity, eps and x0, each converted by FlowPath: still the global flow.

    Exact wherever the conversions are (t in [t_eps, 1 - t_eps]); at t outside that range the eps and x0
    experts answer with their exact velocity at the nearest t of the range (the guard), off by O(t_eps).
    """
    path, ensemble, global_flow = build_mixed(schedule)
    assert [type(e).__name__ for e in ensemble.experts.values()] == [
        "MixtureFlow",
        "PredictionToVelocity",
        "PredictionToVelocity",
    ]
    g = torch.Generator().manual_seed(0)
    for t in TIMES:
        x = 4.0 * torch.randn(512, D, generator=g, dtype=torch.float64)
        tt = torch.full((512,), t, dtype=torch.float64)
        got, want = ensemble(x, tt), global_flow(x, tt)
        assert torch.isfinite(got).all(), f"not finite at t={t} ({schedule})"
        inside = path.t_eps <= t <= 1 - path.t_eps
        tol = 1e-9 if inside else 1e-3
        torch.testing.assert_close(
            got, want, rtol=tol, atol=tol, msg=f"mixed ensemble != global flow at t={t} ({schedule})"
        )


def test_the_identity_is_not_trivial():
    """Top-1 and a wrong (uniform) router both miss the global flow at mid t: the test can fail."""
    path, top1, global_flow, router = build("linear", strategy="top1")
    uniform = Ensemble(list(top1.experts.values()), _UniformRouter(len(CLUSTERS)), strategy="full")
    x = 2.0 * torch.randn(2048, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((2048,), 0.8, dtype=torch.float64)
    v = global_flow(x, t)
    assert (top1(x, t) - v).abs().max() > 1e-2
    assert (uniform(x, t) - v).abs().max() > 1e-2
    # a nucleus short of all the mass drops experts, and misses the global flow as top-1 does
    _, nucleus, _, _ = build("linear", "nucleus", top_p=0.6)
    assert (nucleus(x, t) - v).abs().max() > 1e-2
    assert experts_per_sample(nucleus.usage, len(x)) > 1  # though more than one expert per sample on average


class _UniformRouter(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.num_outputs = k

    def forward(self, x, t, y=None):
        return torch.zeros(x.shape[0], self.num_outputs, dtype=x.dtype)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampling_the_exact_ensemble_recovers_the_mixture(schedule):
    path, ensemble, _, router = build(schedule)
    n = 6000
    x0 = sample(
        ensemble, path, (n, D), steps=40, solver="heun", dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    mean, cov = mixture_moments()
    torch.testing.assert_close(x0.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x0.T), cov, atol=0.25, rtol=0.05)
    # cluster frequencies: each sample's cluster is the router's argmax at t ~ 0
    t0 = torch.full((n,), 1e-4, dtype=torch.float64)
    freq = torch.bincount(router(x0, t0).argmax(1), minlength=len(CLUSTERS)).double() / n
    torch.testing.assert_close(freq, torch.tensor(CLUSTER_WEIGHTS, dtype=torch.float64), atol=0.025, rtol=0)
