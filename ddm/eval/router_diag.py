"""Router diagnostics on labelled held-out data: accuracy, entropy and calibration per bucket of t.

The router's optimum is the posterior p(k | x_t, t). Near t = 0 (clean data)
it should name the cluster of the image; near t = 1 (pure noise) it can do no
better than the prior. Per bucket of t this reports:

- ``accuracy``: how often the argmax is the image's cluster;
- ``entropy``: mean entropy of the predicted distribution (nats);
- ``confidence``: mean probability of the argmax;
- ``ece``: expected calibration error (Guo et al. 2017): samples binned by
  confidence into ``ece_bins`` equal bins, ``sum_b (n_b / n) |acc_b - conf_b|``;
- ``nll``: mean negative log-likelihood of the true cluster.

Noise and t are drawn from a seeded CPU generator, so two routers (or reruns)
see the same inputs. Optional per-sample weights make the figures those of
another distribution (e.g. held-out sets not drawn in the data's proportions).
"""

from __future__ import annotations

import math

import torch

from ddm.devices import module_device, to_device
from ddm.errors import BadInput
from ddm.flow import FlowPath


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10, weights: torch.Tensor | None = None
) -> float:
    """ECE with ``bins`` equal-width confidence bins on [0, 1] (a confidence of exactly 1 goes in the last)."""
    w = torch.ones_like(confidence) if weights is None else weights.to(confidence.dtype)
    w = w / w.sum()
    index = (confidence * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = index == b
        mass = w[m].sum()
        if mass > 0:
            acc = (w[m] * correct[m].to(w.dtype)).sum() / mass
            conf = (w[m] * confidence[m]).sum() / mass
            ece += float(mass * (acc - conf).abs())
    return ece


@torch.no_grad()
def router_probs_on_device(
    router, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256, device=None
) -> torch.Tensor:
    """Softmax of ``router(x, t, y)`` in batches, left on ``device`` (None: the router's): no read on the host
    inside the loop.

    Each batch's inputs cross once (pinned, asynchronous on CUDA); t crosses once for all batches.
    """
    device = module_device(router) if device is None else torch.device(device)
    t = to_device(t, device)
    out = []
    for lo in range(0, len(x), batch_size):
        sl = slice(lo, lo + batch_size)
        logits = router(to_device(x[sl], device), t[sl], None if y is None else to_device(y[sl], device))
        out.append(logits.float().softmax(-1))
    return torch.cat(out)


def router_probs(
    router, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256, device=None
) -> torch.Tensor:
    """Softmax of ``router(x, t, y)`` in batches on ``device``, brought back to the CPU at once."""
    return router_probs_on_device(router, x, t, y, batch_size, device).cpu()


def summarize(probs: torch.Tensor, k: torch.Tensor, ece_bins: int = 10, weights: torch.Tensor | None = None) -> dict:
    """Accuracy, entropy, confidence, ECE and NLL of predicted distributions ``probs`` [N, K] for clusters ``k``."""
    # float64 sums: an accuracy of 1 should read 1.0, not 0.9999999
    probs = probs.double()
    w = torch.ones(len(k), dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()
    conf, pred = probs.max(-1)
    correct = (pred == k).float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    nll = -probs.gather(1, k[:, None]).squeeze(1).clamp_min(1e-12).log()
    return dict(
        n=int(len(k)),
        accuracy=float((w * correct).sum()),
        entropy=float((w * entropy).sum()),
        confidence=float((w * conf).sum()),
        ece=expected_calibration_error(conf, correct, ece_bins, w),
        nll=float((w * nll).sum()),
    )


def router_diagnostics(
    router,
    path: FlowPath,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    k: torch.Tensor,
    buckets: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    ece_bins: int = 10,
    weights: torch.Tensor | None = None,
    device=None,
) -> list[dict]:
    """One row per equal bucket of t in [0, 1]: the figures of ``summarize`` plus the prior's.

    Each held-out image is noised once per bucket at a t drawn uniformly inside
    it. ``prior_accuracy`` / ``prior_entropy`` are those of always answering with
    the cluster frequencies of ``k``: what the router should fall to at t = 1.
    """
    if buckets < 1:
        raise BadInput(f"router diagnostics need at least one t bucket, got {buckets}")
    num = int(max(int(k.max()) + 1, getattr(router, "num_outputs", 0)))
    w = torch.ones(len(k)) if weights is None else weights.float()
    prior = torch.zeros(num).index_add_(0, k, w) / w.sum()
    prior_entropy = float(-(prior * prior.clamp_min(1e-12).log()).sum())
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    for b in range(buckets):
        lo, hi = b / buckets, (b + 1) / buckets
        t = lo + (hi - lo) * torch.rand(len(x0), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        probs = router_probs(router, path.interpolate(x0, eps, t), t, y, batch_size, device)
        rows.append(
            dict(
                t_lo=lo,
                t_hi=hi,
                **summarize(probs, k, ece_bins, weights),
                prior_accuracy=float(prior.max()),
                prior_entropy=prior_entropy,
                max_entropy=math.log(num),
            )
        )
    return rows


def heldout_diagnostics(
    router, path: FlowPath, x0, y, k, prior: torch.Tensor, buckets: int, seed: int, device=None
) -> list[dict]:
    """``router_diagnostics`` of a held-out set, weighted to the clusters' proportions ``prior``.

    A held-out set need not have the clusters' proportions (a small cluster's
    held-out shard is small), so each sample is weighted by prior[k] / count[k]:
    the figures are those of the data distribution. Each row gains
    ``calibration_gap`` = |confidence - accuracy|. The router is called as it is
    (its mode and device are the caller's); the noise is drawn on the CPU, so the
    figures do not depend on ``device``. The router's final record
    (``accuracy_by_t``) and its training preview are both this.
    """
    counts = torch.bincount(k, minlength=len(prior)).float()
    weights = (prior / counts.clamp_min(1))[k]
    rows = router_diagnostics(router, path, x0, y, k, buckets=buckets, seed=seed, weights=weights, device=device)
    return [dict(row, calibration_gap=abs(row["confidence"] - row["accuracy"])) for row in rows]


def usage_per_step(usage: list[dict], num_images: int | None = None) -> list[dict]:
    """Sampling-time expert usage per solver evaluation, from merged ``Ensemble.usage`` records.

    ``selected``: fraction of the ``num_images`` images each expert ran on (for
    ``full`` every expert runs on every image); ``weight``: the expert's mean
    routing weight, which sums to 1 over experts for every strategy.
    """
    rows = []
    for i, rec in enumerate(usage):
        n = num_images or max(1, max(rec["counts"]))
        rows.append(
            dict(
                step=i,
                t=float(rec["t"]),
                selected=[c / n for c in rec["counts"]],
                weight=[float(x) for x in rec.get("weights", [])],
            )
        )
    return rows
