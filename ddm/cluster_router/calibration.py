"""The data tau is fitted on: a few held-out images per cluster, noised to the sampler's times, denoised by the
experts, embedded as the router embeds while sampling.

Which experts denoise: the estimate the router must judge is one that does not already know the cluster. The
estimate of the image's own expert does (an expert's x0 estimate lies in its cluster by construction), so on it
every image is nearest its own cluster and the fit drives tau to 0. The stage therefore denoises with the experts
weighted by p(k | y), the router's own posterior at t = 1 (``weights``); ``weights=None`` takes each image's own
expert (what the router sees along a trajectory that keeps its expert). The first call (t = 1) is left out: the
router reads only p(k | y) there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.models.velocity import guided_velocity


def calibration_indices(clusters: np.ndarray, num_clusters: int, per_cluster: int, seed: int) -> dict[int, np.ndarray]:
    """Up to ``per_cluster`` indices of each cluster's images (a seeded draw, sorted); refused for an empty cluster."""
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    picked = {}
    for k in range(int(num_clusters)):
        members = np.flatnonzero(clusters == k)
        if len(members) == 0:
            raise BadInput(
                f"no held-out image falls in cluster {k}: tau cannot be fitted on it; use a larger held-out set "
                f"(eval.heldout) or sample.route_tau=null (the clustering's own)"
            )
        take = min(int(per_cluster), len(members))
        picked[k] = np.sort(rng.choice(members, size=take, replace=False))
    return picked


@torch.no_grad()
def denoised_calibration(
    experts: Mapping[int, Callable],
    path: FlowPath,
    images: Mapping[int, tuple[torch.Tensor, torch.Tensor | None]],
    times: Sequence[float],
    embed: Callable,
    scales: Sequence[float | None] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    weights: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings [N, D], clusters [N])``: every image of cluster k (``images[k] = (x0, y)``, model space) noised to
    each of ``times`` and denoised by ``experts[k]`` or, with ``weights(y, n) -> [n, K]`` (rows summing to 1), by
    every expert weighted so; guided at each time with ``scales`` (None: unguided there; the sampler's guidance at
    its times). Noise is drawn on the CPU from ``seed``, so the data do not depend on the device.
    """
    scales = [None] * len(times) if scales is None else list(scales)
    if len(scales) != len(times):
        raise BadInput(f"{len(scales)} guidance scales for {len(times)} times: give one per time (None: unguided)")
    generator = torch.Generator().manual_seed(int(seed))
    out, owners = [], []
    for k in sorted(images):
        x0, y = images[k]
        for t_value, scale in zip(times, scales):
            for lo in range(0, len(x0), int(batch_size)):
                x = x0[lo : lo + int(batch_size)]
                yy = None if y is None else y[lo : lo + int(batch_size)]
                t = torch.full((len(x),), float(t_value), dtype=x.dtype, device=x.device)
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x_t = path.interpolate(x, eps, t)
                if weights is None:
                    v = guided_velocity(experts[k], x_t, t, yy, scale)
                else:
                    w = weights(yy, len(x)).to(x.device, x.dtype)
                    v = sum(
                        w[:, j].reshape(-1, *[1] * (x.dim() - 1)) * guided_velocity(m, x_t, t, yy, scale)
                        for j, m in sorted(experts.items())
                    )
                out.append(torch.as_tensor(embed(path.x0_from_velocity(x_t, v.to(x_t.dtype), t))).float().cpu())
                owners.append(torch.full((len(x),), int(k), dtype=torch.long))
    if not out:
        raise BadInput("no calibration images: tau needs at least one image of one cluster and one time")
    return torch.cat(out), torch.cat(owners)
