"""FLOP accounting: measured forward FLOPs per network, training FLOPs, sampling FLOPs per image.

Forward FLOPs are counted by ``torch.utils.flop_counter`` (matmuls, convolutions
and attention; a multiply-add is 2 FLOPs; elementwise ops are not counted, as
in the DiT paper's GFLOPs). Training FLOPs are 3 x forward per sample seen
(forward plus a backward of about twice its cost).

Sampling FLOPs per image follow from how ``Ensemble`` and ``sample`` execute::

    calls       = steps (euler) | 2 * steps - 1 (heun: its last step is Euler)
    experts     = 1 (top1) | top_k (topk) | K (full) | 1 (sample)   expert evaluations per call
                | the measured mean (threshold, nucleus: see below)
    cfg_factor  = 2 when guidance is on (cfg_scale != 1, conditional model): each
                  selected expert runs on the doubled batch; the router runs
                  once, on the conditional input
    guided      = the calls that are guided: all of them, or those inside
                  sample.cfg_interval (the others are unguided: cfg_factor 1)
    per_image   = guided * (router + experts * cfg_factor * expert)
                  + (calls - guided) * (router + experts * expert)

    A schedule of strategies over t (``full:0.6:top1``, ``ddm.routing_schedule``) sums
    the same per call, each call with the experts of the piece its t falls in.

    cfg_routing=separate (guidance on): the router runs on the conditional and the
    null input, and the experts chosen for each: per_image = calls * (2 * router +
    (experts + uncond_experts) * expert); for a fixed count both are the same number.

``threshold`` and ``nucleus`` run as many experts per sample as the router's
confidence asks for, so their count is a property of the images sampled, not of
the settings. Their ``experts`` is the mean over the solver evaluations of the
experts each sample ran on, taken from the usage records of the images that were
generated (``Ensemble.usage``; ``ddm.ensemble.experts_per_sample``): the FLOPs
those images cost, per image. Without usage it is the upper bound K (the cost of
``full``), and ``experts_from`` says which it is; ``per_image_max`` is always the
bound.

Experts may differ in size: ``expert`` is then the mean of their forward FLOPs
(what uniform routing costs; ``full`` runs them all, so its number is exact),
and each row adds ``per_image_min`` / ``per_image_max``, the cost when every call
routes to the cheapest / the priciest experts. The counted ``measured`` number
is the cost of the routing that actually happened.

``measured_sampling_flops`` runs a real sampling call under the counter to
check the formula. ``ddm.eval.flops_summary`` turns these into a run's training
and sampling FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddm.devices import module_device
from ddm.ensemble import DATA_DEPENDENT, Ensemble
from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.job_names import ROUTER_JOB, expert_job
from ddm.models.conditioning import example_condition
from ddm.routing_schedule import parse_strategy
from ddm.sampling.solvers import check_cfg_interval, evaluation_times, in_interval, sample

# Expert evaluations per sample and call of each strategy; for the data-dependent ones (threshold, nucleus)
# the upper bound K, their count being measured from usage where it matters (see the module docstring).
EXPERTS_PER_CALL = {
    "top1": lambda K, k: 1,
    "topk": lambda K, k: k,
    "full": lambda K, k: K,
    "sample": lambda K, k: 1,
    "threshold": lambda K, k: K,
    "nucleus": lambda K, k: K,
}


def experts_bound(strategy: str, num_experts: int, top_k: int) -> int:
    """The most experts one call of ``strategy`` runs per sample; a schedule: its costliest piece's."""
    return max(EXPERTS_PER_CALL[s](int(num_experts), int(top_k)) for s in parse_strategy(strategy).strategies)


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` under torch's FLOP counter (no gradients).

    Attention runs in its math form while counting: the counter does not see
    inside the fused CPU attention kernel, and counted nothing for it there.
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def model_forward_flops(
    model: torch.nn.Module, image_shape: Sequence[int], conditional: bool = True, batch: int = 1
) -> int:
    """Forward FLOPs per sample of a ``model(x, t, y)`` (an expert or a router) on images ``image_shape`` (C, H, W)."""
    device = module_device(model)
    x = torch.zeros(batch, *image_shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = example_condition(model, batch, device) if conditional else None
    return count_flops(model, x, t, y) // batch


def sampling_flops_per_image(
    expert_flops: float | Sequence[float],
    router_flops: float,
    strategy: str | None,
    steps: int,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    conditional: bool = True,
    num_experts: int = 1,
    top_k: int = 2,
    cfg_routing: str = "shared",
    experts_per_call: float | None = None,
    uncond_experts_per_call: float | None = None,
    cfg_interval: Sequence[float] | None = None,
    router_once: bool = False,
) -> dict:
    """FLOPs to sample one image; ``strategy=None`` is a single model (a monolith: no router).

    ``expert_flops`` is the forward FLOPs of one expert per sample, or those of
    each expert (experts of different sizes): the formula then uses their mean,
    and when they differ the row adds ``per_image_min`` (every call routed to the
    cheapest experts) and ``per_image_max`` counts the priciest. ``experts_per_call``
    (and, under separate guidance routing, ``uncond_experts_per_call``): the
    measured mean experts per sample and call of a data-dependent strategy
    (``threshold``, ``nucleus``), e.g. ``ddm.ensemble.experts_per_sample`` of the
    generated images' usage; None: the upper bound K. Fixed-count strategies
    ignore them. Returns the total and its factors, so a report can show them;
    ``experts_from`` is ``strategy`` (a fixed count), ``usage`` (measured) or
    ``bound`` (K, no usage given); ``per_image_max`` is the most any routing costs.
    ``cfg_interval``: guidance only on the calls inside it (``guided_calls`` of the row; ``per_call``
    is a guided call's cost). ``strategy`` may be a schedule (``full:0.6:top1``): each call costs its piece's
    experts, ``experts_per_call`` and ``per_call`` are then the means over the calls, and ``schedule`` gives each
    piece's calls, guided calls and experts per call. ``router_once``: under separate guidance routing the router
    still costs ``router_flops`` once per call (the cluster router embeds each sample once; its null row reuses it).
    """
    each = None if np.ndim(expert_flops) == 0 else sorted(float(f) for f in expert_flops)
    if each is not None and not each:
        raise BadInput("sampling FLOPs need the forward FLOPs of at least one expert")
    mean = float(np.mean(each)) if each is not None else float(expert_flops)
    times = evaluation_times(FlowPath(), int(steps), solver)
    calls = len(times)
    guided = conditional and float(cfg_scale) != 1.0
    cfg_factor = 2 if guided else 1
    interval = check_cfg_interval(cfg_interval) if guided else None
    guided_at = [guided and in_interval(t, interval) for t in times]
    schedule = None if strategy is None else parse_strategy(strategy)
    if schedule is None:
        router_flops = 0
        pieces = ["single"] * calls
        bounds = {"single": 1}
    else:
        pieces = [schedule.strategy_at(t) for t in times]
        bounds = {s: EXPERTS_PER_CALL[s](int(num_experts), int(top_k)) for s in schedule.strategies}
    bound = max(bounds.values())
    experts, uncond, source = dict(bounds), dict(bounds), "strategy"
    if strategy in DATA_DEPENDENT:
        source = "usage" if experts_per_call is not None else "bound"
        experts[strategy] = bound if experts_per_call is None else float(experts_per_call)
        uncond[strategy] = bound if uncond_experts_per_call is None else float(uncond_experts_per_call)
    separate = guided and strategy is not None and cfg_routing == "separate"
    router_passes = 1 if router_once else 2

    def call_cost(piece: str, guided_call: bool, cond_flops, uncond_flops) -> float:
        """One call's FLOPs when its conditional input's experts cost ``cond_flops(piece)`` per sample, the null's
        ``uncond_flops(piece)`` (the same experts unless routed separately)."""
        if not guided_call:
            return router_flops + cond_flops(piece)
        if separate:  # the router on both inputs (unless it routes both from one pass); each input's own experts
            return router_passes * router_flops + cond_flops(piece) + uncond_flops(piece)
        return router_flops + cfg_factor * cond_flops(piece)

    def per_image_of(cond_flops, uncond_flops) -> float:
        return sum(call_cost(p, g, cond_flops, uncond_flops) for p, g in zip(pieces, guided_at))

    def routed(n, cheapest: bool) -> float:
        """Forward FLOPs of ``n`` experts per sample: the cheapest or priciest ``n`` (one size: n x it)."""
        if each is None:
            return n * mean
        n = min(int(n), len(each))
        return float(sum(each[:n]) if cheapest else sum(each[-n:]))

    def expected(p):
        return experts[p] * mean

    def expected_uncond(p):
        return uncond[p] * mean

    guided_calls = sum(guided_at)
    if schedule is not None and not schedule.single:
        per_call = per_image_of(expected, expected_uncond) / calls
        mean_experts = sum(experts[p] for p in pieces) / calls
    else:
        piece = pieces[0]
        per_call = call_cost(piece, guided_calls > 0, expected, expected_uncond)
        mean_experts = experts[piece]
    row = dict(
        per_image=int(round(per_image_of(expected, expected_uncond))),
        per_call=int(round(per_call)),
        calls=calls,
        experts_per_call=mean_experts,
        cfg_factor=cfg_factor,
        router_per_call=int(round((router_passes if separate else 1) * router_flops)),
        expert_forward=int(round(mean)),
        experts_from=source,
        per_image_max=int(round(per_image_of(lambda p: routed(bounds[p], False), lambda p: routed(bounds[p], False)))),
    )
    if guided and guided_calls < calls:
        row.update(guided_calls=guided_calls, cfg_interval=[float(v) for v in cfg_interval])
    if separate:
        row.update(cfg_routing="separate", uncond_experts_per_call=sum(uncond[p] for p in pieces) / calls)
    if schedule is not None and not schedule.single:
        row["schedule"] = [
            dict(
                strategy=name,
                calls=sum(1 for p in pieces if p == name),
                guided_calls=sum(1 for p, g in zip(pieces, guided_at) if p == name and g),
                experts_per_call=experts[name],
            )
            for name in dict.fromkeys(schedule.strategies)
        ]
    if each is not None and each[0] != each[-1]:

        def fewest(p):  # data-dependent: at least the top expert
            return routed(1 if p in DATA_DEPENDENT else bounds[p], True)

        cheapest = int(round(per_image_of(fewest, fewest)))
        if cheapest != row["per_image_max"]:  # not when every call runs every expert (full)
            row["per_image_min"] = cheapest
    return row


def measured_sampling_flops(
    model,
    path,
    image_shape: Sequence[int],
    y: torch.Tensor | None,
    steps: int,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    seed: int = 0,
    usage: list | None = None,
    cfg_interval: Sequence[float] | None = None,
) -> int:
    """FLOPs per image of a real ``sample`` call on ``len(y)`` images (or 2 when unconditional), counted.

    ``usage``: a list that receives an ensemble's usage records of the counted call
    (what a data-dependent strategy's formula needs to be checked against it).
    """
    n = len(y) if y is not None else 2
    generator = torch.Generator().manual_seed(int(seed))
    device = module_device(model)
    flops = count_flops(
        sample,
        model,
        path,
        (n, *image_shape),
        y=y,
        steps=int(steps),
        solver=solver,
        cfg_scale=float(cfg_scale),
        cfg_interval=cfg_interval,
        generator=generator,
        device=device,
    )
    if isinstance(model, Ensemble):
        if usage is not None:
            usage.extend(model.usage)
        model.reset_usage()  # the counted call is not a sampling run: leave no usage records
    return flops // n


def forward_flops(
    experts: Mapping[int, torch.nn.Module],
    router: torch.nn.Module,
    image_shape: Sequence[int],
    conditional: bool,
    calls: int | None = None,
) -> dict:
    """Measured forward FLOPs per sample: ``{"expert-KK": ..., "router": ...}``.

    A router of the run's clusters (``ddm.cluster_router.ClusterRouter``, which needs ``calls``, the model calls
    of one trajectory): its encoder and centroid distances per model call, averaged over the calls
    (``router_flops_per_call``).
    """
    from ddm.cluster_router import ClusterRouter, EncoderAsModel, router_flops_per_call

    fwd = {expert_job(k): model_forward_flops(m, image_shape, conditional) for k, m in experts.items()}
    if isinstance(router, ClusterRouter):
        encoder = model_forward_flops(EncoderAsModel(router.embed), image_shape, conditional=False)
        num_centroids, dim = router.centroids.shape
        fwd[ROUTER_JOB] = int(round(router_flops_per_call(encoder, num_centroids, dim, int(calls), router.every)))
    else:
        fwd[ROUTER_JOB] = model_forward_flops(router, image_shape, conditional)
    return fwd


def expert_flops(forward: Mapping[str, int]) -> list[int]:
    """Forward FLOPs of each expert in a ``forward_flops`` dict (the router left out), in its order."""
    return [v for k, v in forward.items() if k != ROUTER_JOB]


def mean_expert_flops(forward: Mapping[str, int]) -> float:
    """Mean forward FLOPs of the experts in a ``forward_flops`` dict (the router left out)."""
    return float(np.mean(expert_flops(forward)))


def forward_per_call(
    forward: Mapping[str, int], strategy: str | None, top_k: int, experts_per_call: float | None = None
) -> int:
    """Forward FLOPs of one model call (no guidance) of an ensemble strategy, or of one expert (None).

    ``experts_per_call``: the measured mean of a data-dependent strategy (None: its bound K).
    With experts of different sizes: the mean expert (uniform routing); exact for ``full``.
    A schedule (``full:0.6:top1``): its costliest piece (one call may fall in any piece).
    """
    mean = mean_expert_flops(forward)
    if strategy is None:
        return int(mean)
    num_experts = sum(1 for k in forward if k != ROUTER_JOB)
    experts = experts_bound(strategy, num_experts, int(top_k))
    if strategy in DATA_DEPENDENT and experts_per_call is not None:
        experts = float(experts_per_call)
    return int(forward[ROUTER_JOB] + experts * mean)
