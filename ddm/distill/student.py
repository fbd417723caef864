"""The distilled student of a run (``distilled/expert.pt``, written by ``ddm distill``) as a plain PyTorch model.

The file has an expert's layout (``kind="expert"``: ``load_expert`` reads it) plus
``distilled_from``::

    {clustering_id, num_experts, experts: {"expert-KK": sha256 of that expert.pt}}

A student stands for the experts it was distilled from only: ``load_distilled``
refuses one whose experts were retrained since (another sha256), whose run was
clustered again, or that is missing, naming the command that makes a current one.
"""

from __future__ import annotations

import logging
import os

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.flow import flow_path_from_config
from ddm.io import read_json, sha256_file
from ddm.job_names import expert_job
from ddm.sampling.checkpoints import expert_ids_on_disk, load_expert, verify_weights
from ddm.sampling.draw import DISTILLED
from ddm.sampling.loaded import LoadedModels

log = logging.getLogger("ddm")


def expert_sha256(rd: RunDir, k: int) -> str | None:
    """The sha256 of expert ``k``'s ``expert.pt``: its record's ``weights_sha256`` (the file itself when the
    record has none); None when the expert has no ``expert.pt``."""
    weights = rd.expert_weights(k)
    if not weights.exists():
        return None
    record = read_json(rd.expert_record(k)) if rd.expert_record(k).exists() else {}
    return record.get("weights_sha256") or sha256_file(weights)


def distilled_from(rd: RunDir, num_experts: int, clustering_id: str) -> dict:
    """What a student records of its teachers: the clustering and every expert's sha256 (all must exist)."""
    shas = {expert_job(k): expert_sha256(rd, k) for k in range(int(num_experts))}
    missing = [k for k in range(int(num_experts)) if shas[expert_job(k)] is None]
    if missing:
        raise MissingInput(
            f"distill needs all {num_experts} experts, but experts {missing} have no expert.pt "
            f"({', '.join(str(rd.expert_weights(k)) for k in missing)}): train them with "
            f"`ddm train-expert expert.id=N`"
        )
    return dict(clustering_id=clustering_id, num_experts=int(num_experts), experts=shas)


def current_clustering(rd: RunDir) -> str | None:
    """The run's clustering id now (partition index, else cluster report), None when neither exists."""
    for path in (rd.partitions_index, rd.cluster_report):
        if path.exists():
            cid = read_json(path).get("clustering_id")
            if cid is not None:
                return cid
    return None


def check_distilled_current(source: dict | None, rd: RunDir, where) -> None:
    """Refuse a student (its ``distilled_from``) distilled from other experts than the run's current ones.

    Experts absent from this copy of the run cannot be compared; they are logged, not refused.
    """
    redo = "distill it again from the current experts with `ddm distill redo=true`"
    if not source or "experts" not in source:
        raise BadInput(f"{where} does not say which experts it was distilled from (no distilled_from): {redo}")
    K, cid = int(source["num_experts"]), source.get("clustering_id")
    current = current_clustering(rd)
    if current is not None and cid != current:
        raise BadInput(
            f"{where} was distilled from experts of clustering {cid}, but the run is clustering {current}: {redo}"
        )
    extra = [k for k in expert_ids_on_disk(rd) if k >= K]
    if extra:
        raise BadInput(f"{where} was distilled from K={K} experts, but {rd.experts} also holds experts {extra}: {redo}")
    changed, absent = [], []
    for k in range(K):
        now = expert_sha256(rd, k)
        if now is None:
            absent.append(k)
        elif now != source["experts"].get(expert_job(k)):
            changed.append(k)
    if changed:
        raise BadInput(
            f"{where} was distilled from other experts than the run's current ones (expert.pt sha256 of "
            f"experts {changed} differ from its distilled_from): {redo}"
        )
    if absent:
        log.warning("%s: experts %s are not in this run directory; its teachers could not be checked", where, absent)


def load_distilled(run_dir: str | os.PathLike, device="cpu"):
    """``(student, flow_path, info)`` of the run's distilled model, checked to be current (see the module docstring).

    ``info`` (``LoadedModels``) has the fields of ``load_ensemble``'s that a sampler reads (num_experts,
    clustering_id, flow, num_classes, text, latents, image_size, in_channels) plus the student's ``size``,
    ``steps``, ``label_dropout`` and ``distilled_from``; ``experts`` and ``missing_experts`` are empty (no expert
    runs when the student samples).
    """
    rd = RunDir(run_dir)
    path = rd.distilled_weights
    if not path.exists():
        raise MissingInput(
            f"sample.model={DISTILLED}: no distilled model at {path}: run `ddm distill` first "
            f"(or sample the ensemble with sample.model=ensemble)"
        )
    verify_weights(path, rd.distilled_record)
    net, meta = load_expert(path)
    check_distilled_current(meta.get("distilled_from"), rd, path)
    config = meta["model_config"]
    info = LoadedModels(
        num_experts=int(meta["num_experts"]),
        experts=[],
        missing_experts=[],
        clustering_id=meta["clustering_id"],
        steps=meta.get("steps"),
        label_dropout=meta.get("label_dropout"),
        distilled_from=meta["distilled_from"],
        flow=meta["flow"],
        num_classes=config.get("num_classes", 0),
        text=meta.get("text"),
        latents=meta.get("latents"),
        image_size=config["image_size"],
        in_channels=config["in_channels"],
        size=config["size"],
    )
    return net.to(device).eval(), flow_path_from_config(meta["flow"]), info


def check_student_guidance(info: LoadedModels, cfg_scale: float, key: str = "sample.cfg_scale") -> None:
    """Refuse guidance with a student whose null label was never trained (``distill.label_dropout=0``)."""
    if float(cfg_scale) == 1.0 or not (info.num_classes or info.text):
        return
    p = info.label_dropout
    if p is not None and float(p) <= 0:
        raise BadInput(
            f"{key}={cfg_scale} needs the distilled model's unconditional branch, but it was distilled with "
            f"distill.label_dropout=0: sample with {key}=1, or distill again with distill.label_dropout > 0"
        )
