"""What each stage reads from a run in a bucket and what it writes back, by key (folders, or single files).

A job of a run in a bucket (``run_dir=s3://...``) pulls only these before it runs and pushes only these after:
an expert's job pulls its own partition (and the small files that say which clustering it belongs to), never
another cluster's data, and pushes only its own folder. Keys ending in ``.json`` are single files; the others are
folders; a key with ``*`` is the files of an indexed folder that match it; a key ending in ``?`` is pulled
when it is there (the stage does without it). ``{k}`` is the expert's id, two digits.
"""

from __future__ import annotations

from ddm.errors import BadInput

# Small files that tie a job to its run: the data's manifest, the clustering's report and the partitions' index.
LINEAGE = ("data/manifest.json", "clusters/report.json", "partitions/manifest.json")

READS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "embed": ("data",),
    "cluster": ("data/manifest.json", "embeddings"),
    "partition": ("data", "clusters"),
    "encode": ("data/manifest.json", "clusters/report.json", "partitions"),
    "train-expert": (*LINEAGE, "partitions/cluster-{k}"),
    "train-router": ("data/manifest.json", "clusters", "partitions"),
    "sample": (*LINEAGE, "clusters", "partitions/cluster-*/manifest.json", "experts", "router?"),
    # the evaluation machine reads the data (its feature net trains on it) and the samples when there are some
    "evaluate": (
        "data",
        "embeddings/manifest.json",
        "clusters",
        "partitions/manifest.json",
        "partitions/cluster-*/manifest.json",
        "experts",
        "router?",
        "samples?",
    ),
}
WRITES: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "embed": ("embeddings",),
    "cluster": ("clusters",),
    "partition": ("partitions",),
    "encode": ("latents",),
    "train-expert": ("experts/expert-{k}",),
    "train-router": ("router",),
    "sample": ("samples",),
    "evaluate": ("evaluation",),
}


# The record that says a written folder is finished, as the stage's own check of a rerun reads it: a rerun on a
# fresh machine pulls it alone (not 10 GB of samples to find them done) while the folder's index lists it.
MARKERS: dict[str, str] = {
    "data": "data/manifest.json",
    "embeddings": "embeddings/manifest.json",
    "clusters": "clusters/report.json",
    "partitions": "partitions/manifest.json",
    "experts/expert-{k}": "experts/expert-{k}/record.json",
    "router": "router/record.json",
    "samples": "samples/record.json",
    "evaluation": "evaluation/metrics.json",
}
# What a stage's check of a rerun reads, besides the records of what it wrote (``MARKERS``): when all it writes is
# finished in the bucket, it first runs on these alone. Stages not listed check against what they read in full
# (the sample stage, the evaluation: the experts' weights).
CHECKS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "embed": (),
    "cluster": (),
    "partition": ("data/manifest.json", "clusters/report.json"),
    "train-expert": (*LINEAGE, "partitions/cluster-{k}/manifest.json"),
    "train-router": (*LINEAGE, "partitions/cluster-*/manifest.json"),
}
# A stage's parts write one folder from several jobs; each would push it with an index of its own files.
PARTS = {
    "prepare": "data.parts",
    "embed": "embed.parts",
    "partition": "cluster.partition_parts",
    "sample": "sample.parts",
}


def marker(folder: str, expert_id: int | None = None) -> str | None:
    """The key of the record that says the written ``folder`` is finished, if it has one."""
    k = "" if expert_id is None else f"{int(expert_id):02d}"
    return next((m.format(k=k) for f, m in MARKERS.items() if f.format(k=k) == folder), None)


def check_whole(stage: str, cfg) -> None:
    """Refuse a stage run in parts on a run in a bucket, naming the setting."""
    key = PARTS.get(stage)
    section, name = key.split(".") if key else (None, None)
    parts = getattr(getattr(cfg, section), name) if key else None
    if parts is not None and int(parts) > 1:
        raise BadInput(
            f"{key}={parts}: a stage in parts does not run on a run in a bucket ({cfg.run_dir}) yet; run "
            f"`ddm {stage}` whole (without {key}) on one machine"
        )


def check_keys(stage: str, expert_id: int | None = None) -> list[str] | None:
    """What ``stage``'s check of a rerun reads (``CHECKS``); None when it reads all the stage reads."""
    if stage not in CHECKS:
        return None
    k = "" if expert_id is None else f"{int(expert_id):02d}"
    return [r.format(k=k) for r in CHECKS[stage]]


def stage_keys(stage: str, expert_id: int | None = None) -> tuple[list[str], list[str]]:
    """``(reads, writes)`` of ``stage`` for a run in a bucket; a stage not listed cannot run on one yet."""
    if stage not in READS:
        raise BadInput(
            f"`ddm {stage}` does not run on a run in a bucket yet (the stages that do: {', '.join(READS)}); "
            f"run it on a local copy"
        )
    k = "" if expert_id is None else f"{int(expert_id):02d}"
    return [r.format(k=k) for r in READS[stage]], [w.format(k=k) for w in WRITES[stage]]
