"""Drawing samples from a run's ensemble: the settings that decide what is drawn, the routing they set,
and sampling in batches with each expert's usage per solver evaluation.

The sample stage, the evaluate stage and the training previews draw through here, so one
set of settings means the same images wherever it is read.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ddm.devices import autocast_dtype
from ddm.ensemble import Ensemble, check_routing
from ddm.errors import BadInput
from ddm.images import to_uint8
from ddm.routing_schedule import check_strategy, parse_strategy
from ddm.sampling.checkpoints import AVAILABLE
from ddm.sampling.grid import LABEL_ORDERS, check_grid_rows
from ddm.sampling.indexed import RowStreams, index_noise
from ddm.sampling.offload import offload
from ddm.sampling.route_tau import FITTED
from ddm.sampling.solvers import check_cfg_interval, sample
from ddm.seeds import ROUTING_OFFSET
from ddm.settings import Sample

log = logging.getLogger("ddm")

PROGRESS_EVERY_S = 60.0  # seconds between progress lines of a long sampling run

DISTILLED = "distilled"  # sample.model=distilled, and the name of its row in the evaluation
MODELS = ("ensemble", DISTILLED)  # the values of sample.model


ROUTERS = ("trained", "clusters")  # the values of sample.router


def check_router_settings(router, every, tau) -> tuple[str, int, float | str | None]:
    """``sample.router``, ``sample.route_every`` and ``sample.route_tau``, checked."""
    router = str(router or "trained")
    if router not in ROUTERS:
        raise BadInput(
            f"sample.router={router!r} is not one of {', '.join(ROUTERS)} (trained: router/router.pt; clusters: "
            f"the run's clusters and clustering encoder, no router.pt)"
        )
    every = 1 if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise BadInput(f"sample.route_every={every!r} must be a whole number >= 1")
    if tau is not None and tau != FITTED:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise BadInput(
                f"sample.route_tau={tau!r} must be a positive number, {FITTED} (router/route_tau.json of "
                f"`ddm fit-route-tau`) or null (the clustering's own)"
            )
        tau = float(tau)
    return router, every, tau


def check_model(value) -> str:
    """``sample.model``, checked."""
    model = str(value or "ensemble")
    if model not in MODELS:
        raise BadInput(f"sample.model={value!r} is not one of {', '.join(MODELS)}")
    return model


# The options that change what is sampled: a record with other values is stale (and `model`, `label_order`,
# `router`, `route_every` and `route_tau`, when not their defaults: see requested_settings).
SETTINGS = (
    "strategy",
    "top_k",
    "threshold",
    "top_p",
    "cfg_routing",
    "experts",
    "temperature",
    "solver",
    "steps",
    "cfg_scale",
    "cfg_interval",
    "per_class",
    "grid_rows",
    "num_samples",
    "seed",
    "precision",
    "prompts",
    "prompts_file",
)


def requested_settings(sc: Sample) -> dict:
    """The sampling settings that decide what is drawn, checked, from the ``sample`` settings."""
    values = sc.to_dict()
    out = {k: values[k] for k in SETTINGS}
    # checked here, so a bad value fails before any network is loaded (the evaluate stage's settings too)
    out["threshold"], out["top_p"], out["cfg_routing"] = check_routing(
        out["threshold"], out["top_p"], out["cfg_routing"]
    )
    out["strategy"] = check_strategy(out["strategy"])  # a schedule in one spelling: full:0.6:top1
    out["grid_rows"] = check_grid_rows(out["grid_rows"])
    interval = check_cfg_interval(out["cfg_interval"])
    out["cfg_interval"] = None if interval is None else list(interval)
    experts = out["experts"]
    if isinstance(experts, str):
        if experts != AVAILABLE:
            raise BadInput(
                f"sample.experts={experts!r}: use null (all experts), a list of ids such as "
                f"[0,2], or {AVAILABLE!r} (the experts that exist)"
            )
    elif experts is not None:
        out["experts"] = sorted(int(k) for k in experts)
    if values["label_order"] not in LABEL_ORDERS:
        raise BadInput(f"sample.label_order={values['label_order']!r} is not one of {', '.join(LABEL_ORDERS)}")
    if values["label_order"] != "random":  # only when not the default: records made before the option stay valid
        out["label_order"] = values["label_order"]
    # only when it is not the ensemble: records made before sample.model existed stay valid
    model = check_model(values["model"])
    if model != "ensemble":
        out["model"] = model
    # the router and its options, likewise only when not their defaults
    router, every, tau = check_router_settings(values.get("router"), values.get("route_every"), values.get("route_tau"))
    if router != "trained":
        out["router"] = router
    if every != 1:
        out["route_every"] = every
    if tau is not None:
        out["route_tau"] = tau
    if router == "clusters" and model == "ensemble" and parse_strategy(out["strategy"]).first != "sample":
        log.warning(
            "sample.router=clusters with sample.strategy=%s: the cluster router routes well with strategy=sample, "
            "or a schedule that starts with it (sample:0.5:top1): each sample keeps the cluster drawn from p(k|y) at "
            "t=1; %s at t = 1 sends the samples to the most common cluster and leaves the others unused",
            out["strategy"],
            parse_strategy(out["strategy"]).first,
        )
    return out


ROUTING = ("strategy", "top_k", "temperature", "threshold", "top_p", "cfg_routing", "generator")


def rerouted(ensemble: Ensemble, **routing) -> Ensemble:
    """The same experts and router (their modules shared, nothing loaded again) under other routing settings.

    ``routing``: any of ``ROUTING`` (strategy, top_k, temperature, threshold, top_p, cfg_routing, generator);
    the others stay as they are. The one way a loaded ensemble is routed otherwise: the sample stage sets the
    options ``load_ensemble`` does not take, the evaluation routes one set of modules by every strategy.
    """
    unknown = sorted(set(routing) - set(ROUTING))
    if unknown:
        raise TypeError(f"rerouted() takes the routing settings {ROUTING}, not {unknown}")
    now = {name: getattr(ensemble, name) for name in ROUTING}
    out = Ensemble(
        {int(k): m for k, m in ensemble.experts.items()},
        ensemble.router,
        subset=ensemble.active_ids,
        num_experts=ensemble.num_experts,
        **{**now, **routing},
    ).eval()
    out.offload = ensemble.offload  # one device cache for the shared modules
    return out


def offloaded(ensemble, sc: Sample, device):
    """``ensemble`` with its experts in host memory, fetched to ``device`` when routed, when ``sample.offload``.

    Offloading changes where the experts wait, never what is drawn, so it is not one of ``SETTINGS``. The
    ensemble is best loaded on the CPU first: loading it on the device would need room for every expert.
    """
    if not sc.offload or not hasattr(ensemble, "reset_usage"):
        return ensemble  # off, or one network (the distilled student): nothing to offload
    return offload(ensemble, device, sc.offload_budget_gb)


# The per-expert fields of a usage record, summed (counts) or image-weighted (weights) over batches.
USAGE_FIELDS = ("counts", "weights", "uncond_counts", "uncond_weights")


def merge_usage(chunks: list[tuple[list[dict], int]]) -> list[dict]:
    """One usage record per solver evaluation from ``(records, images)`` of several batches (or jobs).

    Counts are summed; weights (each chunk's mean over its images) become the mean over all images. Every chunk
    has the same evaluations (one sampling setting); chunks without records (one network) give ``[]``.
    """
    chunks = [(records, int(n)) for records, n in chunks if records]
    if not chunks:
        return []
    total = sum(n for _, n in chunks)
    merged = []
    for i, first in enumerate(chunks[0][0]):
        rec = dict(t=float(first["t"]))
        for f in (f for f in USAGE_FIELDS if f in first):
            if f.endswith("counts"):
                rec[f] = [int(sum(c)) for c in zip(*(r[i][f] for r, _ in chunks))]
            else:
                rec[f] = [float(sum(w)) / total for w in zip(*([x * n for x in r[i][f]] for r, n in chunks))]
        merged.append(rec)
    return merged


def draw(
    ensemble,
    path,
    shape,
    labels,
    total,
    batch_size,
    settings,
    seed: int,
    device,
    decode=None,
    start: int = 0,
    routing_seed: int | None = None,
):
    """Sample images ``start .. start + total - 1`` of a run in batches; usage records merged per solver evaluation.

    ``labels``: those of these ``total`` samples (labels, a TextCondition, or None). Sample ``i`` starts from
    its own noise (``seed``) and draws its experts (the ``sample`` strategy) from its own stream
    (``routing_seed``, default ``seed + ROUTING_OFFSET``), so a range gives the images one job drawing every
    index would (``ddm.sampling.indexed``). ``decode`` turns a latent run's samples into images
    (``latent_decoder``); None: they are images. A model that records no usage (one network: the distilled
    student) gives ``usage=[]``.
    """
    precision = autocast_dtype(settings.get("precision"), torch.device(device), "sample.precision")
    routing_seed = int(seed) + ROUTING_OFFSET if routing_seed is None else int(routing_seed)
    routed = hasattr(ensemble, "reset_usage")
    chunks, usage = [], []
    began = shown = time.monotonic()
    for lo in range(0, total, batch_size):
        n = min(batch_size, total - lo)
        indices = range(start + lo, start + lo + n)
        y = None if labels is None else labels[lo : lo + n].to(device)  # labels, or a TextCondition
        if routed:
            ensemble.reset_usage()
            if ensemble.schedule.uses("sample"):  # the only strategy that draws: per sample, from its own stream
                ensemble.generator = RowStreams(routing_seed, indices)
        x = sample(
            ensemble,
            path,
            (n, *shape),
            y=y,
            steps=int(settings["steps"]),
            solver=settings["solver"],
            cfg_scale=float(settings["cfg_scale"]),
            cfg_interval=settings.get("cfg_interval"),
            device=device,
            x_init=index_noise(path, seed, indices, shape),
            autocast=precision,
        )
        chunks.append(to_uint8(x if decode is None else decode(x)))
        usage.append((list(ensemble.usage) if routed else [], n))
        if time.monotonic() - shown >= PROGRESS_EVERY_S:  # a long run says how far it is, at most once a minute
            shown = time.monotonic()
            done = lo + n
            log.info(
                "sample: %d of %d images (%.0f%%), %.1f images/s",
                done,
                total,
                100 * done / total,
                done / (shown - began),
            )
    images = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
    return images, merge_usage(usage)
