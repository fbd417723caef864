"""Loading the trained artefacts of a run (``expert.pt``, ``router.pt``) as plain PyTorch modules.

Each file is a dict written by ``ddm.train.export.save_weights``::

    kind="expert" | "router", model_config (constructor kwargs), state_dict,
    flow (FlowPath.config()), num_experts=K, clustering_id, steps, [expert_id],
    [target: what an expert predicts, velocity | eps | x0; files without it: velocity]

``ddm.sampling.ensemble_loading.load_ensemble`` builds the ensemble from them and checks that the pieces belong
together before sampling (``ddm.sampling.fit``): experts and router trained on one clustering (or its
lineage), with one K, one flow path, one image shape and one label set. A
mismatch is an error that names the files and the fix. Experts may differ in
size (``model.size`` of each job) and in what they predict: an expert trained on ``eps`` or ``x0`` is loaded wrapped in
``ddm.models.prediction.PredictionToVelocity``, so the ensemble and the solvers
see velocities only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.flow import PREDICTIONS, flow_path_from_config
from ddm.io import read_json, sha256_file
from ddm.job_names import ROUTER_JOB, expert_id_of, expert_job
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.prediction import as_velocity_model

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


def available_ids(rd: RunDir, K: int, subset: str) -> list[int]:
    """The ids of ``sample.experts=available``: the experts that exist, the missing ones logged."""
    if subset != AVAILABLE:
        raise BadInput(f"sample.experts={subset!r}: use null (all experts), a list of ids, or {AVAILABLE!r}")
    on_disk = [k for k in expert_ids_on_disk(rd) if k < K]  # ids >= K are refused by wanted_ids
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


def wanted_ids(rd: RunDir, K: int, subset, owner: str | None = None) -> list[int]:
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
