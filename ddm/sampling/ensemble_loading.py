"""The sampling-time ``Ensemble`` of a run: its experts and a router, checked to belong together.

The router is the trained one (``router/router.pt``) or, with ``router="clusters"``, one built from the run's
clusters (``ddm.cluster_router``); the experts are checked against whichever says what K and the clustering are
(``ddm.sampling.fit``), then both are assembled the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddm.artifacts import RunDir
from ddm.ensemble import Ensemble
from ddm.errors import BadInput, MissingInput
from ddm.flow import FlowPath, flow_path_from_config
from ddm.io import read_json
from ddm.job_names import expert_job
from ddm.sampling.checkpoints import available_ids, load_expert, load_router, verify_weights, wanted_ids
from ddm.sampling.fit import (
    PATH_FIELDS,
    check_expert,
    check_image_shape,
    check_num_classes,
    check_router,
    common_latents,
    common_text,
)
from ddm.sampling.loaded import LoadedModels
from ddm.sampling.route_tau import FITTED, fitted_tau


def load_ensemble(
    run_dir: str | os.PathLike,
    strategy: str = "top1",
    top_k: int = 2,
    subset: Sequence[int] | str | None = None,
    device="cpu",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    router: str = "trained",
    route_every: int = 1,
    route_tau: float | str | None = None,
    seed: int = 0,
    decode=None,
) -> tuple[Ensemble, FlowPath, LoadedModels]:
    """Build the sampling-time ``Ensemble`` of a run from its router and expert files.

    Args:
        run_dir: the run directory (``experts/expert-KK/expert.pt``, ``router/router.pt``).
        strategy, top_k, temperature, generator: passed to ``Ensemble``.
        subset: expert ids to use; only these must exist. None: all K must exist.
            ``"available"``: every expert that has an ``expert.pt`` (for a run that lost
            an island); the router is renormalised over them and the missing ids are
            logged and returned in ``info.missing_experts``.
        device: where the modules are moved.
        router: ``trained`` (``router/router.pt``) or ``clusters``: the run's clusters route
            (``ddm.cluster_router.ClusterRouter``; no router.pt is read, K and the clustering id come from
            clusters/report.json); ``route_every``, ``route_tau`` are its ``every`` and ``tau``, ``seed`` the
            run's seed (its encoder is rebuilt from it) and ``decode`` a latent run's decoder.

    Returns ``(ensemble, flow_path, info)``; ``info`` (``LoadedModels``) holds K, the
    experts used, the experts missing, the clustering id, the training steps of each
    network, the size and target of each expert (``expert_models``) and the image shape.
    """
    rd = RunDir(run_dir)
    if router == "clusters":
        net, rmeta, members = _cluster_members(rd, subset, route_every, route_tau, seed, decode)
        path = flow_path_from_config(members.metas[members.wanted[0]]["flow"])  # the experts' own
    elif router == "trained":
        net, rmeta, members = _trained_members(rd, subset)
        path = flow_path_from_config(rmeta["flow"])
    else:
        raise BadInput(f"sample.router={router!r} is not one of trained, clusters")
    routing = dict(strategy=strategy, top_k=top_k, generator=generator, temperature=temperature)
    ensemble, info = _assemble(members, net, device, subset, routing, router_meta=rmeta)
    return ensemble, path, info


@dataclass(frozen=True)
class _Members:
    """The experts loaded and checked, and what they were checked against."""

    experts: dict
    metas: dict
    wanted: list[int]
    missing: list[int]
    clustering_id: str
    num_experts: int


def _trained_members(rd: RunDir, subset):
    """The trained router (``router/router.pt``, its metadata) and the experts checked against it."""
    if rd.router_weights.exists():
        verify_weights(rd.router_weights, rd.router_record)
    net, rmeta = load_router(rd.router_weights)
    K, cid = int(rmeta["num_experts"]), rmeta["clustering_id"]
    check_router(net, rmeta, rd)
    if isinstance(subset, str):
        subset = available_ids(rd, K, subset)
    wanted = wanted_ids(rd, K, subset)
    missing = [k for k in range(K) if k not in wanted]

    experts, metas = {}, {}
    for k in wanted:
        verify_weights(rd.expert_weights(k), rd.expert_record(k))
        experts[k], metas[k] = load_expert(rd.expert_weights(k))
        check_expert(k, metas[k], rmeta)
    check_num_classes(experts, net, metas, rmeta)
    check_image_shape(metas, rmeta)

    return net, rmeta, _Members(experts, metas, wanted, missing, cid, K)


def _cluster_members(rd: RunDir, subset, every, tau, seed, decode):
    """The router of the run's clusters (no router.pt; no metadata) and the experts checked against the
    clustering."""
    from ddm.cluster_router import ClusterRouter, run_embedder
    from ddm.lineage import check_member, cluster_ids, lineage_sizes

    if not rd.cluster_report.exists():
        raise MissingInput(
            f"sample.router=clusters routes by the run's clusters, but {rd.cluster_report} does not exist: "
            f"run `ddm cluster` (or use sample.router=trained)"
        )
    report = read_json(rd.cluster_report)
    K, cid = int(report["k"]), report["clustering_id"]
    # what the experts are checked against: the clustering, and for a grown run the ancestor of each kept cluster
    record = dict(
        num_experts=K,
        clustering_id=cid,
        cluster_ids=cluster_ids(dict(report, num_clusters=K)),
        lineage=lineage_sizes(dict(report, num_clusters=K)),
    )
    if isinstance(subset, str):
        subset = available_ids(rd, K, subset)
    wanted = wanted_ids(rd, K, subset, owner=f"the clustering {rd.cluster_report}")
    missing = [k for k in range(K) if k not in wanted]

    experts, metas = {}, {}
    for k in wanted:
        verify_weights(rd.expert_weights(k), rd.expert_record(k))
        experts[k], metas[k] = load_expert(rd.expert_weights(k))
        where = metas[k]["path"]
        if int(metas[k].get("expert_id", k)) != k:
            raise BadInput(
                f"{where} holds expert {metas[k]['expert_id']}, not expert {k}: the file was copied into the wrong "
                f"folder; retrain or move it to experts/{expert_job(metas[k]['expert_id'])}"
            )
        check_member(metas[k], k, record, f"expert {k} ({where}, routed by the clusters of {rd.cluster_report})")
    first = metas[wanted[0]]
    paths = {metas[k]["path"]: {f: metas[k]["flow"].get(f) for f in PATH_FIELDS} for k in wanted}
    if len({str(v) for v in paths.values()}) > 1:
        raise BadInput(f"the experts were trained on different flow paths ({paths}): retrain with one flow.schedule")
    classes = {metas[k]["path"]: experts[k].num_classes for k in wanted}
    if len(set(classes.values())) > 1:
        raise BadInput(f"the experts were trained on different label sets (num_classes by file: {classes})")
    check_image_shape(metas, first)
    path = flow_path_from_config(first["flow"])
    num_classes = int(first["model_config"].get("num_classes", 0) or 0)
    embed = run_embedder(rd.root, seed, decode)
    if tau == FITTED:  # router/route_tau.json of `ddm fit-route-tau`, while the clustering and experts are its own
        tau = fitted_tau(rd)
    router = ClusterRouter.from_run(rd.root, embed, path, num_classes, tau=tau, every=every)
    return router, None, _Members(experts, metas, wanted, missing, cid, K)


def _assemble(members: _Members, router, device, subset, routing: dict, router_meta):
    """The ``Ensemble`` of checked experts and a router on ``device``, and what ``LoadedModels`` says of them.

    ``router_meta``: the trained router's metadata (its steps, label dropout, text and latents are compared and
    recorded); None for a router built from the clusters (no trained router: those are None, the experts'
    own text and latents stand).
    """
    experts, metas, wanted = members.experts, members.metas, members.wanted
    ensemble = (
        Ensemble(
            experts, router, subset=wanted if subset is not None else None, num_experts=members.num_experts, **routing
        )
        .to(device)
        .eval()
    )
    # one image shape and label set for all (checked before); the sizes may differ
    first = metas[wanted[0]]
    config = first["model_config"]
    trained = router_meta is not None
    info = LoadedModels(
        num_experts=members.num_experts,
        experts=wanted,
        missing_experts=members.missing,
        clustering_id=members.clustering_id,
        router_steps=router_meta.get("steps") if trained else None,
        # None for files written before the field existed (or no trained router): not known, so not refused
        router_label_dropout=router_meta.get("label_dropout") if trained else None,
        expert_steps={k: metas[k].get("steps") for k in wanted},
        # None for files written before the field existed: not known, so not refused
        expert_label_dropout={k: metas[k].get("label_dropout") for k in wanted},
        # experts may differ in size and in what they predict (each is converted to velocity)
        expert_models={k: dict(size=metas[k]["model_config"].get("size"), target=metas[k]["target"]) for k in wanted},
        # the experts' path as they trained on it: a trained router shares its schedule (checked) but draws its
        # own training t (router.time_sampling), which says nothing about what the samples come from
        flow=first["flow"],
        num_classes=config.get("num_classes", 0),
        # the text encoder the experts were trained with (None: class labels); prompts go through it
        text=common_text(metas, router_meta if trained else {}),
        # latent runs: the VAE that decodes the samples and the pixel shape (None: pixels)
        latents=common_latents(metas, router_meta if trained else first),
        image_size=config["image_size"],
        in_channels=config["in_channels"],
    )
    return ensemble, info


class DeferredDecode:
    """A latent decoder known only after loading: ``load_ensemble(router="clusters", decode=DeferredDecode())``
    builds the cluster router's encoder before the experts say which VAE they use; set ``fn`` (latents -> images
    in [-1, 1]) once it is built. Until then, and for a pixel run (``fn`` None), images pass as they are."""

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, x):
        return x if self.fn is None else self.fn(x)


def router_options(settings: dict, seed: int) -> dict:
    """``load_ensemble``'s router keywords from the recorded sampling settings (``requested_settings``).

    ``{}`` for the trained router, whose call stays as it always was. For ``sample.router=clusters``: its
    ``every``, ``tau``, the run's ``seed`` (its encoder is rebuilt from it) and ``decode``, a ``DeferredDecode``
    whose ``fn`` the caller sets to a latent run's decoder once the experts have named their VAE.
    """
    if settings.get("router", "trained") == "trained":
        return {}
    return dict(
        router=settings["router"],
        route_every=int(settings.get("route_every", 1)),
        route_tau=settings.get("route_tau"),
        seed=int(seed),
        decode=DeferredDecode(),
    )
