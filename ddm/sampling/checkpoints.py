"""Loading the trained artefacts of a run (``expert.pt``, ``router.pt``) as plain PyTorch modules.

Each file is a dict written by ``ddm.train.export.save_weights``::

    kind="expert" | "router", model_config (constructor kwargs), state_dict,
    flow (FlowPath.config()), num_experts=K, clustering_id, steps, [expert_id],
    [target: what an expert predicts, velocity | eps | x0; files without it: velocity]

``load_ensemble`` checks that the pieces belong together before sampling:
experts and router trained on one clustering, with one K, one flow path, one
image shape and one label set. A mismatch is an error that names the files and
the fix. Experts may differ in size (``model.size`` of each job) and in what they
predict: an expert trained on ``eps`` or ``x0`` is loaded wrapped in
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
from ddm.cluster.lineage import check_member
from ddm.ensemble import Ensemble
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.flow import PREDICTIONS, FlowPath, flow_path_from_config
from ddm.io import read_json, sha256_file
from ddm.jobs import ROUTER_JOB, expert_id_of, expert_job
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.prediction import as_velocity_model

log = logging.getLogger("ddm")

# ``subset="available"``: sample with the experts that exist (an island was lost).
AVAILABLE = "available"

# Fields of FlowPath.config() that define the path itself. The others (time
# sampling during training, t_eps) may differ between jobs without changing
# what a velocity or a posterior means.
PATH_FIELDS = ("schedule",)


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
) -> tuple[Ensemble, FlowPath, dict]:
    """Build the sampling-time ``Ensemble`` of a run from its router and expert files.

    Args:
        run_dir: the run directory (``experts/expert-KK/expert.pt``, ``router/router.pt``).
        strategy, top_k, temperature, generator: passed to ``Ensemble``.
        subset: expert ids to use; only these must exist. None: all K must exist.
            ``"available"``: every expert that has an ``expert.pt`` (for a run that lost
            an island); the router is renormalised over them and the missing ids are
            logged and returned in ``info["missing_experts"]``.
        device: where the modules are moved.

    Returns ``(ensemble, flow_path, info)``; ``info`` holds K, the experts used,
    the experts missing, the clustering id, the training steps of each network,
    the size and target of each expert (``expert_models``) and the image shape.
    """
    rd = RunDir(run_dir)
    if rd.router_weights.exists():
        verify_weights(rd.router_weights, rd.router_record)
    router, rmeta = load_router(rd.router_weights)
    K, cid = int(rmeta["num_experts"]), rmeta["clustering_id"]
    _check_router(router, rmeta, rd)
    if isinstance(subset, str):
        subset = _available_ids(rd, K, subset)
    wanted = _wanted_ids(rd, K, subset)
    missing = [k for k in range(K) if k not in wanted]

    experts, metas = {}, {}
    for k in wanted:
        verify_weights(rd.expert_weights(k), rd.expert_record(k))
        experts[k], metas[k] = load_expert(rd.expert_weights(k))
        _check_expert(k, metas[k], rmeta)
    _check_num_classes(experts, router, metas, rmeta)
    _check_image_shape(metas, rmeta)

    ensemble = (
        Ensemble(
            experts,
            router,
            strategy=strategy,
            top_k=top_k,
            subset=wanted if subset is not None else None,
            generator=generator,
            temperature=temperature,
            num_experts=K,
        )
        .to(device)
        .eval()
    )
    # one image shape and label set for all (checked above); the sizes may differ
    first = metas[wanted[0]]["model_config"]
    info = dict(
        num_experts=K,
        experts=wanted,
        missing_experts=missing,
        clustering_id=cid,
        router_steps=rmeta.get("steps"),
        # None for files written before the field existed: not known, so not refused
        router_label_dropout=rmeta.get("label_dropout"),
        expert_steps={k: metas[k].get("steps") for k in wanted},
        # None for files written before the field existed: not known, so not refused
        expert_label_dropout={k: metas[k].get("label_dropout") for k in wanted},
        # experts may differ in size and in what they predict (each is converted to velocity)
        expert_models={k: dict(size=metas[k]["model_config"].get("size"), target=metas[k]["target"]) for k in wanted},
        flow=rmeta["flow"],
        num_classes=first.get("num_classes", 0),
        # the text encoder the experts were trained with (None: class labels); prompts go through it
        text=_common_text(metas, rmeta),
        # latent runs: the VAE that decodes the samples and the pixel shape (None: pixels)
        latents=_common_latents(metas, rmeta),
        image_size=first["image_size"],
        in_channels=first["in_channels"],
    )
    return ensemble, flow_path_from_config(rmeta["flow"]), info


def check_guidance(info: dict, cfg_scale: float, key: str = "sample.cfg_scale", cfg_routing: str = "shared") -> None:
    """Refuse classifier-free guidance with experts (or, routed separately, a router) whose null label was never
    trained.

    An expert trained with ``label_dropout=0`` never saw the null label, so its
    "unconditional" velocity is noise from an untrained embedding row and
    guidance amplifies it. With ``cfg_routing=separate`` the router routes the
    null input too, so its own null label must have been trained.
    """
    if float(cfg_scale) == 1.0 or not (info.get("num_classes") or info.get("text")):
        return
    router_dropout = info.get("router_label_dropout")
    if cfg_routing == "separate" and router_dropout is not None and float(router_dropout) <= 0:
        raise BadInput(
            "sample.cfg_routing=separate routes guidance's null input with the router, but it was trained with "
            "router.label_dropout=0 (its null label is untrained): use sample.cfg_routing=shared, or retrain "
            "the router with router.label_dropout > 0 (e.g. 0.1)"
        )
    untrained = [k for k, p in info.get("expert_label_dropout", {}).items() if p is not None and float(p) <= 0]
    if untrained:
        raise BadInput(
            f"{key}={cfg_scale} needs each expert's unconditional branch, but experts {untrained} were trained "
            f"with expert.label_dropout=0 (their null label is untrained): sample with {key}=1, or retrain "
            f"them with expert.label_dropout > 0 (e.g. 0.1)"
        )


def _common_latents(metas: dict, rmeta: dict) -> dict | None:
    """The latent space every expert and the router share; mixing VAEs (or latents and pixels) is refused."""
    seen = {
        path: (m.get("latents") or {}).get("vae", {}).get("weights_sha256")
        for path, m in [(m["path"], m) for m in metas.values()] + [(rmeta["path"], rmeta)]
    }
    if len(set(seen.values())) > 1:
        raise BadInput(
            f"the experts and the router were trained in different latent spaces (VAE weights by file: {seen}); "
            f"train them all on one run's latents"
        )
    return next(iter(metas.values())).get("latents")


def _text_tower(meta: dict):
    text = meta.get("text")
    return None if not text else (text.get("model"), text.get("weights_sha256"), text.get("init_seed"))


def _common_text(metas: dict, rmeta: dict) -> dict | None:
    """The text tower every expert (and a router that reads captions) was trained with; mixing towers is
    refused, since one prompt encoding serves them all."""
    seen = {m["path"]: _text_tower(m) for m in metas.values()}
    if rmeta.get("text"):
        seen[rmeta["path"]] = _text_tower(rmeta)
    if len(set(seen.values())) > 1:
        raise BadInput(
            f"the models were trained with different text towers (model, weights sha256, random seed by file: "
            f"{seen}); train them all with one text.model and text.pretrained"
        )
    return next(iter(metas.values())).get("text")


def _check_router(router, rmeta: dict, rd: RunDir) -> None:
    K = int(rmeta["num_experts"])
    if router.num_outputs != K:
        raise BadInput(
            f"{rmeta['path']} says num_experts={K} but its network has {router.num_outputs} "
            f"outputs: the file is inconsistent; retrain with `ddm train-router redo=true`"
        )
    if rd.cluster_report.exists():
        report = read_json(rd.cluster_report)
        k_report = report.get("k", report.get("num_clusters"))
        if k_report is not None and int(k_report) != K:
            raise BadInput(
                f"the router {rmeta['path']} was trained for K={K} experts but "
                f"{rd.cluster_report} has K={k_report} clusters: retrain the router "
                f"(`ddm train-router redo=true`) or use the run it belongs to"
            )
        cid_report = report.get("clustering_id")
        if cid_report is not None and cid_report != rmeta["clustering_id"]:
            raise BadInput(
                f"the router {rmeta['path']} was trained on clustering {rmeta['clustering_id']}, "
                f"but {rd.cluster_report} is clustering {cid_report}: retrain the router and "
                f"experts on the current clustering or use the matching run"
            )


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


def _wanted_ids(rd: RunDir, K: int, subset) -> list[int]:
    on_disk = expert_ids_on_disk(rd)
    extra = [k for k in on_disk if k >= K]
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


def _check_expert(k: int, meta: dict, rmeta: dict) -> None:
    where = meta["path"]
    if int(meta.get("expert_id", k)) != k:
        raise BadInput(
            f"{where} holds expert {meta['expert_id']}, not expert {k}: the file was copied "
            f"into the wrong folder; retrain or move it to experts/{expert_job(meta['expert_id'])}"
        )
    # the router's clustering, or for a grown run the ancestor this expert's cluster was kept from
    check_member(meta, k, rmeta, f"expert {k} ({where}, for the router {rmeta['path']})")
    mine = {f: meta["flow"].get(f) for f in PATH_FIELDS}
    theirs = {f: rmeta["flow"].get(f) for f in PATH_FIELDS}
    if mine != theirs:
        raise BadInput(
            f"expert {k} was trained on flow path {mine}, the router on {theirs} "
            f"({where} vs {rmeta['path']}): they must share one path; retrain with the same "
            f"flow.schedule"
        )


def _check_image_shape(metas: dict, rmeta: dict) -> None:
    """Every expert and the router take images of one shape (experts of other sizes still see the same x)."""

    def shape(meta):
        mc = meta["model_config"]
        return (int(mc["in_channels"]), int(mc["image_size"]))

    seen = {meta["path"]: shape(meta) for meta in metas.values()}
    seen[rmeta["path"]] = shape(rmeta)
    if len(set(seen.values())) > 1:
        detail = ", ".join(f"{path}: {c} channel(s) x {s}px" for path, (c, s) in seen.items())
        raise BadInput(
            f"the experts and the router were trained on images of different shapes ({detail}); "
            f"one ensemble integrates one x: train them all on the same data (data.image_size, data.channels, "
            f"and in a latent run the same VAE)"
        )


def _check_num_classes(experts: dict, router, metas: dict, rmeta: dict) -> None:
    by_model = {k: e.num_classes for k, e in experts.items()}
    by_model["router"] = router.num_classes
    if len(set(by_model.values())) > 1:
        files = {k: (metas[k]["path"] if k in metas else rmeta["path"]) for k in by_model}
        raise BadInput(
            f"models with num_classes mismatch: {by_model} ({files}); experts and router "
            f"must be trained on the same label set (data.num_classes)"
        )
