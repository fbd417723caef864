"""Held-out flow-matching loss of any velocity model at a fixed grid of t, with fixed noise.

The paper's claim is that experts plus router optimise the same objective as a
monolith. This measures that objective on held-out images for any
``model(x, t, y)``: one expert, a monolith or an ``Ensemble``::

    L(t) = E_{x0, eps} mean_pixels (model(x_t, t, y) - v(x0, eps, t))^2,   x_t = a_t x0 + s_t eps

with the same path and the same per-element MSE as training. The noise of
(sample i, grid point j) is drawn from a generator seeded with ``seed`` and
``j`` alone, so every model sees exactly the same (x_t, t) pairs and the
numbers do not depend on the batch size. ``mean`` averages the grid points
(a Riemann sum of the loss over uniform t when the grid is evenly spaced).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ddm.devices import module_device, to_device
from ddm.ensemble import Ensemble
from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.seeds import generator, grid_noise_seed

NOTE = "per-element MSE to the path's velocity; same noise for every model"


def fixed_noise(shape, seed: int, index: int) -> torch.Tensor:
    """The noise of t-grid point ``index``: the same tensor on every call and every machine (CPU generator)."""
    g = generator(grid_noise_seed(seed, index))
    return torch.randn(tuple(shape), generator=g)


@torch.no_grad()
def loss_totals(
    model, path: FlowPath, x0: torch.Tensor, y, t_grid: Sequence[float], seed: int, batch_size: int, device
) -> torch.Tensor:
    """float64 [len(t_grid)] on ``device``: per grid point, the sum over samples of each sample's mean loss.

    The sum of per-sample means, so a total is a mean over samples whatever the
    batch split; each batch's float32 sum is added in float64, as a Python float
    would be. Nothing is read on the host: each batch's images, noise and labels
    cross once (pinned, asynchronous on CUDA), and the caller reads the totals once.
    """
    device = torch.device(device)
    totals = torch.zeros(len(t_grid), dtype=torch.float64, device=device)
    for j, t_value in enumerate(t_grid):
        eps_all = fixed_noise(x0.shape, seed, j)
        for lo in range(0, len(x0), batch_size):
            x = to_device(x0[lo : lo + batch_size], device)
            eps = to_device(eps_all[lo : lo + batch_size], device)
            t = torch.full((len(x),), float(t_value), device=device)
            labels = None if y is None else to_device(y[lo : lo + batch_size], device)
            totals[j] += path.loss(model, x, labels, t=t, eps=eps).sum().double()
    return totals


@torch.no_grad()
def heldout_fm_loss(
    model,
    path: FlowPath,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    t_grid: Sequence[float],
    seed: int = 0,
    batch_size: int = 256,
    device=None,
) -> dict:
    """``{"per_t": [{"t", "loss"}], "mean", "num_samples"}`` of ``model`` on clean images ``x0`` (model scale).

    ``y`` holds labels (``None``: unconditional calls). Ensembles record routing
    usage on every call; it is cleared afterwards so evaluation leaves no trace,
    and an ensemble's result adds ``experts_per_call``: the mean experts per sample
    it ran on (``ddm.ensemble.experts_per_sample``).
    """
    if len(t_grid) == 0:
        raise BadInput("eval.fm_loss.t_grid is empty: give at least one t in (0, 1)")
    bad = [t for t in t_grid if not 0.0 <= float(t) <= 1.0]
    if bad:
        raise BadInput(f"eval.fm_loss.t_grid values {bad} are outside [0, 1]")
    device = device or module_device(model)
    if isinstance(model, Ensemble):
        model.reset_usage()  # cleared afterwards anyway: the records of these calls only
    totals = loss_totals(model, path, x0, y, t_grid, seed, batch_size, device).tolist()  # the one read
    rows = [dict(t=float(t_value), loss=total / len(x0)) for t_value, total in zip(t_grid, totals)]
    out = dict(per_t=rows, mean=sum(r["loss"] for r in rows) / len(rows), num_samples=int(len(x0)))
    if isinstance(model, Ensemble):
        # each usage record counts one batch's samples: the mean over records, weighted by batch
        out["experts_per_call"] = sum(sum(r["counts"]) for r in model.usage) / (len(x0) * len(t_grid))
        model.reset_usage()
    return out


def fm_loss_summary(
    models: Mapping[str, tuple[object, int]],
    path: FlowPath,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    t_grid: Sequence[float],
    seed: int = 0,
    batch_size: int = 256,
    device=None,
) -> dict:
    """The ``fm_loss`` section of the evaluate stage's metrics.json: ``heldout_fm_loss`` of several models.

    ``models`` maps a name (``ensemble-<strategy>``, ``expert-KK``) to ``(model,
    forward FLOPs of one call)``; every model sees the same images, t and noise. Returns::

        t_grid, num_samples, seed, note
        models  {<name>: {per_t: [{t, loss}], mean, num_samples, forward_flops_per_call}}
    """
    t_grid = [float(t) for t in t_grid]
    rows = {
        name: dict(heldout_fm_loss(model, path, x0, y, t_grid, seed, batch_size, device), forward_flops_per_call=flops)
        for name, (model, flops) in models.items()
    }
    return dict(t_grid=t_grid, num_samples=len(x0), seed=seed, models=rows, note=NOTE)
