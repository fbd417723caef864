"""What each stage reads from a run in a bucket and what it writes back, by key (folders, or single files).

A job of a run in a bucket (``run_dir=s3://...``) pulls only these before it runs and pushes only these after:
an expert's job pulls its own partition (in a latent run its latents, not the pixels) and the small files that
say which clustering it belongs to, never another cluster's data, and pushes only its own folder. Keys whose
last part has a suffix (``.json``, ``.md``) are single files; the others are folders; a key with ``*`` is the
files of indexed folders that match it; a key ending in ``?`` is pulled when it is there (the stage does
without it). In a key, ``{k}`` is the expert's id (two digits); ``{train}`` is what experts train on:
``partitions``, or ``latents`` in a latent run; a key with ``{c}`` stands for one key per cluster the job
encodes (``vae.clusters``, all by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddm.errors import BadInput

# Small files that tie a job to its run: the data's manifest, the clustering's report and the partitions' index.
LINEAGE = ("data/manifest.json", "clusters/report.json", "partitions/manifest.json")
MANIFESTS = ("partitions/manifest.json", "partitions/cluster-*/manifest.json")  # every cluster's size and identity

READS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "embed": ("data",),
    "cluster": ("data/manifest.json", "embeddings"),
    "partition": ("data", "clusters"),
    "encode": (*LINEAGE, "partitions/cluster-{c}"),
    "train-expert": (*LINEAGE, "partitions/cluster-{k}/manifest.json", "{train}/cluster-{k}"),
    "train-router": ("data/manifest.json", "clusters", *MANIFESTS, "{train}"),
    "distill": ("data/manifest.json", "clusters", *MANIFESTS, "{train}", "experts"),
    # the cluster router (sample.router=clusters) embeds its x0 estimates as the run's embeddings were made
    "sample": (*LINEAGE, "embeddings/manifest.json", "clusters", "partitions/cluster-*/manifest.json", "experts")
    + ("router?", "distilled?"),
    # the held-out images (from data/, or evaluate's) noised, denoised by the experts, embedded as the run embeds
    "fit-route-tau": ("data", "embeddings/manifest.json", "clusters", *MANIFESTS, "experts", "evaluation/heldout?"),
    # records and manifests, each cluster's first shard (its row of the montage) and every job's timing
    "report": (
        "data/manifest.json",
        "clusters/report.json",
        *MANIFESTS,
        "partitions/cluster-*/shard-000000.tar",
        "experts/expert-*/record.json",
        "experts/expert-*/timing.json",
        "router/record.json?",
        "samples/record.json?",
        "timings?",
    ),
    "plan": ("data/manifest.json?",),  # the classes the data really has, once it is prepared
    # the evaluation machine reads the data (its feature net trains on it) and the samples when there are some
    "evaluate": (
        "data",
        "embeddings/manifest.json",
        "clusters",
        *MANIFESTS,
        "experts",
        "router?",
        "distilled?",
        "samples?",
    ),
}
WRITES: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "embed": ("embeddings",),
    "cluster": ("clusters",),
    "partition": ("partitions",),
    "encode": ("latents/cluster-{c}",),
    "train-expert": ("experts/expert-{k}",),
    "train-router": ("router",),
    "distill": ("distilled",),
    "sample": ("samples",),
    "evaluate": ("evaluation",),
    "fit-route-tau": ("router", "evaluation"),  # router/route_tau.json; evaluation/heldout/ when evaluate made none
    "report": ("report.md", "montage.png"),  # files of the run's own folder, for people to read
    "plan": (),  # it prints; it writes nothing
}
# Folders whose files each job puts on its own, with no index (each job's timing: read for display only).
UNINDEXED = ("timings",)
# Stages that add files to folders other jobs write (the router's, the evaluation's): their push adds to the
# folder's index what they made and keeps what it listed, and they pull none of the folder beforehand.
ADDS = ("fit-route-tau",)
LOCKED = ("train-expert", "train-router", "distill")  # stages that own one job folder: locked in the bucket

# The record that says a written folder is finished, as the stage's own check of a rerun reads it: a rerun on a
# fresh machine pulls it alone (not 10 GB of samples to find them done) while the folder's index lists it.
MARKERS: dict[str, str] = {
    "data": "data/manifest.json",
    "embeddings": "embeddings/manifest.json",
    "clusters": "clusters/report.json",
    "partitions": "partitions/manifest.json",
    "latents/cluster-{c}": "latents/cluster-{c}/manifest.json",
    "experts/expert-{k}": "experts/expert-{k}/record.json",
    "router": "router/record.json",
    "distilled": "distilled/record.json",
    "samples": "samples/record.json",
    "evaluation": "evaluation/metrics.json",
}
# A stage whose record is another than the folder's own: its "done" is that record in the folder's index.
STAGE_MARKERS: dict[str, dict[str, str]] = {"fit-route-tau": {"router": "router/route_tau.json", "evaluation": ""}}
# What a stage's check of a rerun reads, besides the records of what it wrote (``MARKERS``): when all it writes is
# finished in the bucket, it first runs on these alone. Stages not listed check against what they read in full
# (the sample stage, the evaluation, the student: the experts' weights).
CHECKS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "embed": (),
    "cluster": (),
    "partition": ("data/manifest.json", "clusters/report.json"),
    "encode": (*LINEAGE, "partitions/cluster-{c}/manifest.json"),
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


@dataclass(frozen=True)
class StageIO:
    """One job's keys: what it reads, what it writes (its job folder first), what its check of a rerun reads
    (None: all it reads), for each written folder that has one, the record that says it is finished, and whether
    it adds to folders others write (``ADDS``)."""

    reads: list[str]
    writes: list[str]
    checks: list[str] | None
    markers: dict[str, str]
    adds: bool = False


def _keys(table: tuple[str, ...], values: dict, clusters: list[int]) -> list[str]:
    out = []
    for key in table:
        each = [dict(values, c=f"{c:02d}") for c in clusters] if "{c}" in key else [values]
        out += [key.format(**v) for v in each]
    return out


def stage_io(stage: str, expert_id: int | None = None, latent: bool = False, clusters=()) -> StageIO:
    """The keys of one job of ``stage`` (``expert_id``: an expert's; ``latent``: a run on VAE latents;
    ``clusters``: those an encode job encodes). A stage not listed cannot run on a run in a bucket yet."""
    if stage not in READS:
        raise BadInput(
            f"`ddm {stage}` does not run on a run in a bucket yet (the stages that do: {', '.join(READS)}); "
            f"run it on a local copy"
        )
    if stage == "encode" and not latent:
        return StageIO([], [], [], {})  # a pixel run: nothing to encode, nothing read
    values = dict(k="" if expert_id is None else f"{int(expert_id):02d}", train="latents" if latent else "partitions")
    clusters = [int(c) for c in clusters]
    writes = _keys(WRITES[stage], values, clusters)
    markers = {}
    for folder, record in MARKERS.items():
        for key, rec in zip(_keys((folder,), values, clusters), _keys((record,), values, clusters)):
            if key in writes:
                markers[key] = rec
    markers.update(STAGE_MARKERS.get(stage, {}))
    markers = {key: rec for key, rec in markers.items() if rec}
    checks = _keys(CHECKS[stage], values, clusters) if stage in CHECKS else None
    return StageIO(_keys(READS[stage], values, clusters), writes, checks, markers, stage in ADDS)


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
