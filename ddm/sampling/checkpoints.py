"""Loading the trained artefacts of a run (``expert.pt``, ``router.pt``) as plain PyTorch modules.

Each file is a dict written by ``ddm.train.export.save_weights``::

    kind="expert" | "router", model_config (constructor kwargs), state_dict,
    flow (FlowPath.config()), num_experts=K, clustering_id, steps, [expert_id],
    [target: what an expert predicts, velocity | eps | x0; files without it: velocity]

``load_ensemble`` checks that the pieces belong together before sampling
(``ddm.sampling.fit``): experts and router trained on one clustering (or its
lineage), with one K, one flow path, one image shape and one label set. A
mismatch is an error that names the files and the fix. Experts may differ in
size (``model.size`` of each job) and in what they predict: an expert trained on ``eps`` or ``x0`` is loaded wrapped in
``ddm.models.prediction.PredictionToVelocity``, so the ensemble and the solvers
see velocities only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ddm.artifacts import RunDir
from ddm.ensemble import Ensemble
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.flow import PREDICTIONS, FlowPath, flow_path_from_config
from ddm.io import read_json, sha256_file
from ddm.job_names import ROUTER_JOB, expert_id_of, expert_job
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.prediction import as_velocity_model
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

log = logging.getLogger("ddm")

# ``subset="available"``: sample with the experts that exist (an island was lost).
AVAILABLE = "available"


def _load(path: str | os.PathLike, kind: str, map_location) -> dict:
    path = Path(path)
    if not path.exists():
        stage = "train-expert" if kind == "expert" else "train-router"
        raise MissingInput(f"no {kind} weights at {path}: run `ddm {stage}` first")
    stage = "train-expert" if kind == "expert" else "train-router"
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or overwritten file fails in many ways inside torch
        raise Unusable(
            f"{path} is damaged or not a {kind} file ({type(e).__name__}: {str(e)[:160]}): copy it again from "
            f"where it was trained, or retrain it with `ddm {stage} redo=true`"
        ) from e
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise BadInput(
            f"{path} is not a {kind} file (kind={found!r}); expected what `ddm "
            f"{'train-expert' if kind == 'expert' else 'train-router'}` writes"
        )
    return payload


def _build(cls, payload: dict, path) -> tuple[torch.nn.Module, dict]:
    model = cls(**payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["path"] = str(path)
    return model, meta


def load_expert(path: str | os.PathLike, map_location="cpu", velocity: bool = True) -> tuple[torch.nn.Module, dict]:
    """One expert's EMA network and its metadata (everything in the file but the weights).

    ``meta["target"]`` says what the network predicts (``velocity`` for files written
    before the field existed). With ``velocity`` (the default) an ``eps`` or ``x0``
    expert comes wrapped in a ``PredictionToVelocity`` on its own flow path, so it
    returns velocities like every other; ``velocity=False``: the bare DiT.
    """
    payload = _load(path, "expert", map_location)
    target = payload.get("target", "velocity")
    if target not in PREDICTIONS:
        raise BadInput(
            f"{path} says its expert predicts target={target!r}, which is not one of {PREDICTIONS}: "
            f"the file was written by another version of ddm; retrain it with `ddm train-expert redo=true`"
        )
    net, meta = _build(DiT, payload, path)
    meta["target"] = target
    if velocity:
        net = as_velocity_model(net, target, flow_path_from_config(meta["flow"]))
    return net, meta


def load_router(path: str | os.PathLike, map_location="cpu") -> tuple[DiTClassifier, dict]:
    """The router network and its metadata."""
    return _build(DiTClassifier, _load(path, "router", map_location), path)


def verify_weights(path: Path, record_path: Path) -> None:
    """Check ``path`` against the ``weights_sha256`` its job recorded in ``record_path`` (when there is one)."""
    if not record_path.exists():
        return
    want = read_json(record_path).get("weights_sha256")
    if want is not None and sha256_file(path) != want:
        raise Unusable(
            f"{path} does not match the checksum in {record_path}: the file was changed or damaged on its way; "
            f"copy experts/ or router/ again from the island that trained it, or retrain it with redo=true"
        )


def models_identity(rd: RunDir) -> dict:
    """``{"router" | "expert-KK" | "distilled": weights sha256}`` as the jobs recorded them (no file is hashed).

    Samples and evaluations record this and are made again when it changes: a
    retrained router or expert must not leave the old one's images looking current.
    """
    records = {ROUTER_JOB: rd.router_record, "distilled": rd.distilled_record}
    records.update({expert_job(k): rd.expert_record(k) for k in expert_ids_on_disk(rd)})
    return {name: read_json(path).get("weights_sha256") for name, path in sorted(records.items()) if path.exists()}


def expert_ids_on_disk(rd: RunDir) -> list[int]:
    """Ids of the ``experts/expert-KK/`` folders that hold a finished ``expert.pt``."""
    if not rd.experts.exists():
        return []
    ids = []
    for folder in rd.experts.glob("expert-*"):
        k = expert_id_of(folder.name)
        if k is not None and (folder / "expert.pt").exists():
            ids.append(k)
    return sorted(ids)


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
    route_tau: float | None = None,
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
        return _load_cluster_ensemble(
            rd, strategy, top_k, subset, device, temperature, generator, route_every, route_tau, seed, decode
        )
    if router != "trained":
        raise BadInput(f"sample.router={router!r} is not one of trained, clusters")
    if rd.router_weights.exists():
        verify_weights(rd.router_weights, rd.router_record)
    net, rmeta = load_router(rd.router_weights)
    K, cid = int(rmeta["num_experts"]), rmeta["clustering_id"]
    check_router(net, rmeta, rd)
    if isinstance(subset, str):
        subset = _available_ids(rd, K, subset)
    wanted = _wanted_ids(rd, K, subset)
    missing = [k for k in range(K) if k not in wanted]

    experts, metas = {}, {}
    for k in wanted:
        verify_weights(rd.expert_weights(k), rd.expert_record(k))
        experts[k], metas[k] = load_expert(rd.expert_weights(k))
        check_expert(k, metas[k], rmeta)
    check_num_classes(experts, net, metas, rmeta)
    check_image_shape(metas, rmeta)

    ensemble, info = _assemble(
        experts,
        net,
        metas,
        wanted,
        missing,
        cid,
        K,
        device,
        subset,
        dict(strategy=strategy, top_k=top_k, generator=generator, temperature=temperature),
        router_meta=rmeta,
    )
    return ensemble, flow_path_from_config(rmeta["flow"]), info


def _assemble(experts, router, metas, wanted, missing, cid, K, device, subset, routing: dict, router_meta):
    """The ``Ensemble`` of checked experts and a router on ``device``, and what ``LoadedModels`` says of them.

    ``router_meta``: the trained router's metadata (its steps, label dropout, text and latents are compared and
    recorded); None for a router built from the clusters (no trained router: those are None, the experts'
    own text and latents stand).
    """
    ensemble = (
        Ensemble(experts, router, subset=wanted if subset is not None else None, num_experts=K, **routing)
        .to(device)
        .eval()
    )
    # one image shape and label set for all (checked before); the sizes may differ
    first = metas[wanted[0]]
    config = first["model_config"]
    trained = router_meta is not None
    info = LoadedModels(
        num_experts=K,
        experts=wanted,
        missing_experts=missing,
        clustering_id=cid,
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


def _load_cluster_ensemble(
    rd: RunDir, strategy, top_k, subset, device, temperature, generator, every, tau, seed, decode
) -> tuple[Ensemble, FlowPath, LoadedModels]:
    """``load_ensemble`` with ``router="clusters"``: the experts routed by the run's clusters (no router.pt)."""
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
        subset = _available_ids(rd, K, subset)
    wanted = _wanted_ids(rd, K, subset, owner=f"the clustering {rd.cluster_report}")
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
    router = ClusterRouter.from_run(rd.root, embed, path, num_classes, tau=tau, every=every)
    ensemble, info = _assemble(
        experts,
        router,
        metas,
        wanted,
        missing,
        cid,
        K,
        device,
        subset,
        dict(strategy=strategy, top_k=top_k, generator=generator, temperature=temperature),
        router_meta=None,
    )
    return ensemble, path, info


def _available_ids(rd: RunDir, K: int, subset: str) -> list[int]:
    """The ids of ``sample.experts=available``: the experts that exist, the missing ones logged."""
    if subset != AVAILABLE:
        raise BadInput(f"sample.experts={subset!r}: use null (all experts), a list of ids, or {AVAILABLE!r}")
    on_disk = [k for k in expert_ids_on_disk(rd) if k < K]  # ids >= K are refused by _wanted_ids
    if not on_disk:
        raise MissingInput(
            f"sample.experts=available: no expert of the K={K} has an expert.pt under "
            f"{rd.experts}; train at least one with `ddm train-expert expert.id=N`"
        )
    missing = [k for k in range(K) if k not in on_disk]
    if missing:
        log.warning(
            "sample: experts %s are missing (%s); sampling with experts %s, the router "
            "renormalised over them: samples from the missing clusters' regions will be poorer",
            missing,
            ", ".join(str(rd.expert_weights(k)) for k in missing),
            on_disk,
        )
    return on_disk


def _wanted_ids(rd: RunDir, K: int, subset, owner: str | None = None) -> list[int]:
    """``owner``: what K comes from (None: the trained router)."""
    on_disk = expert_ids_on_disk(rd)
    extra = [k for k in on_disk if k >= K]
    if extra and owner is not None:
        raise BadInput(
            f"{rd.experts} holds experts {extra} but {owner} has only K={K} clusters: the experts come from "
            f"another clustering; retrain them or use the matching run"
        )
    if extra:
        raise BadInput(
            f"{rd.experts} holds experts {extra} but the router {rd.router_weights} has only "
            f"K={K} outputs: the experts and the router come from different clusterings; "
            f"retrain the router or use the matching run"
        )
    if subset is None:
        wanted = list(range(K))
    else:
        wanted = sorted({int(k) for k in subset})
        bad = [k for k in wanted if not 0 <= k < K]
        if not wanted or bad:
            raise BadInput(f"sample.experts={list(subset)} must name expert ids in 0..{K - 1}")
    missing = [k for k in wanted if k not in on_disk]
    if missing:
        paths = ", ".join(str(rd.expert_weights(k)) for k in missing)
        hint = (
            ""
            if subset is not None or not on_disk
            else f", or sample with the ones you have: sample.experts=available (or the list sample.experts={on_disk})"
        )
        raise MissingInput(
            f"experts {missing} are missing ({paths}): train them with `ddm train-expert expert.id=N`{hint}"
        )
    return wanted
