"""Names of a run's jobs, built and read in one place.

A run has one job per stage, except ``train-expert``, which has one job per
expert, and ``prepare``, ``embed`` or ``partition`` written in parts (one job per part, ``prepare-part-0003``,
and the merge, ``prepare``): ``train-expert-03`` is expert 3's timing name, ``expert-03`` its
folder, log and wandb name; ``ensemble-top1`` names an ensemble in the
metrics. Nothing else builds or parses these strings (SLURM's own patterns
for them live in ``ddm.launch.sbatch``).
"""

from __future__ import annotations

from ddm.settings import Settings

EXPERT_STAGE = "train-expert"
ROUTER_JOB = "router"
ROUTER_STAGE = "train-router"
DISTILL_STAGE = "distill"  # the optional student of the experts: one job, distilled/


def expert_job(expert_id: int) -> str:
    """``expert-03``: the folder under ``experts/``, the job in logs, records and wandb."""
    return f"expert-{int(expert_id):02d}"


def expert_stage_job(expert_id: int) -> str:
    """``train-expert-03``: the name the stage runner records expert 3's timing under."""
    return f"{EXPERT_STAGE}-{int(expert_id):02d}"


def stage_job(stage: str, cfg: Settings) -> str:
    """The job a stage run stands for: the stage name, ``train-expert-KK`` for an expert, or
    ``prepare-part-JJJJ`` (``embed-``, ``partition-``) for one part of a stage written by many jobs
    (``data.part``, ``embed.part``, ``cluster.partition_part``), or ``encode-cluster-KK`` for the encode
    of some clusters (``vae.clusters``)."""
    if stage == EXPERT_STAGE:
        return expert_stage_job(int(cfg.expert.id))
    if stage == "prepare" and cfg.data.part is not None:
        return f"prepare-part-{int(cfg.data.part):04d}"
    if stage == "embed" and cfg.embed.part is not None and int(cfg.embed.parts or 1) > 1:
        return f"embed-part-{int(cfg.embed.part):04d}"
    if stage == "partition" and cfg.cluster.partition_part is not None:
        return f"partition-part-{int(cfg.cluster.partition_part):04d}"
    if stage == "encode" and cfg.vae.clusters is not None:  # an island's encode of its own clusters
        ids = [cfg.vae.clusters] if isinstance(cfg.vae.clusters, int) else list(cfg.vae.clusters)
        return "encode-cluster-" + "-".join(f"{int(i):02d}" for i in sorted(ids))
    return stage


def ensemble_name(strategy: str) -> str:
    """``ensemble-top1``: an ensemble under one routing strategy, beside ``expert-KK`` in the metrics."""
    return f"ensemble-{strategy}"


def is_expert(name: str) -> bool:
    """True for ``expert-03`` and ``train-expert-03``."""
    return expert_id_of(name) is not None


def is_training_job(name: str) -> bool:
    """The jobs that train a network: ``train-expert-KK``, ``train-router`` and ``distill``."""
    return name.startswith(f"{EXPERT_STAGE}-") or name in (ROUTER_STAGE, DISTILL_STAGE)


def expert_id_of(job: str) -> int | None:
    """The expert id in ``expert-03`` or ``train-expert-03``; None for any other job."""
    for prefix in (f"{EXPERT_STAGE}-", "expert-"):
        if job.startswith(prefix) and job[len(prefix) :].isdigit():
            return int(job[len(prefix) :])
    return None
