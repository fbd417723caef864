"""Stage ``partition``: one shard set per cluster, so each expert reads only its own data.

Each cluster's samples are stored in a random order drawn from the run's
``seed`` (see ``ddm.cluster.shard_split``), whatever the order of data/.

Reads data/ and clusters/ (assignments.npz, report.json); writes
partitions/cluster-KK/ (shards + manifest.json recording the clustering_id and
the data shards it was copied from) and, last, partitions/manifest.json. A
finished partitions/ is reused only while it was made from the current
clustering and the current data; after a reclustering, or data prepared again,
it is rebuilt.

With ``cluster.partition_parts=N``, separate jobs write it: ``cluster.partition_part=J`` writes
the clusters of part J alone (J, J+N, ...; a cluster done already is kept) and a last
``ddm partition cluster.partition_parts=N`` merges them into partitions/manifest.json, copying
nothing; the result is the same bytes as one job's (``ddm.cluster.partition_parts``). Each
cluster's manifest records the settings it was made with, so the merge can tell a part made
with others.

Before it copies a byte it shows that what it reads belongs together: the
assignments are the report's, the report was computed from the run's embeddings
(``embeddings_id``), those from the run's data, and every data shard matches its
checksum (rereading only the shards changed since ``partitions/verified.json``, or
a part's own ``verified-part-JJJJ-of-NNNN.json``): a partition's own checksums are
computed here, so a damaged data shard would otherwise pass on as a whole-looking
partition.
"""

from __future__ import annotations

import logging
import shutil

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments
from ddm.cluster.partition_parts import (
    cache_path,
    check_parts,
    done_clusters,
    merged_manifests,
    part_clusters,
    part_command,
)
from ddm.cluster.shard_split import write_partitions
from ddm.data.ingest import resolve_workers
from ddm.data.shards import MANIFEST, load_manifest, shards_digest
from ddm.data.verified import check_recorded
from ddm.embed import check_embeddings_of_data, embeddings_id
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, write_json
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with

log = logging.getLogger("ddm")


def run(cfg: Settings) -> dict:
    """Write partitions/cluster-KK/ for every cluster; return partitions/manifest.json's content.

    With ``cluster.partition_parts=N`` and ``cluster.partition_part=J``: write part J's clusters only and
    return a summary of the part; with ``partition_parts=N`` alone: merge the parts, copying nothing.
    """
    run_dir = RunDir(cfg.run_dir)
    marker = run_dir.partitions / MANIFEST
    if not run_dir.cluster_report.exists():
        raise MissingInput(f"no clustering at {run_dir.cluster_report}: run the cluster stage first")
    report = read_json(run_dir.cluster_report)
    current = report["clustering_id"]
    parts, part = int(cfg.cluster.partition_parts), cfg.cluster.partition_part
    check_parts(parts, part, int(report["k"]))

    data_manifest = load_manifest(run_dir.data) if run_dir.data_manifest.exists() else None
    if marker.exists():
        done = read_json(marker)
        if done.get("clustering_id") == current and not _same_data(done, data_manifest):
            # the checks below decide: a clustering of the old data is refused, one of this data is partitioned
            log.info("partition: data/ changed since the partitions were written; rebuilding partitions")
        elif done.get("clustering_id") == current and not cfg.redo:
            check_made_with("partition", run_dir.partitions, done.get("settings"), made_with(cfg))
            log.info(
                "partition: done already (K=%d id=%s); redo=true rebuilds -> %s",
                done["num_clusters"],
                current,
                run_dir.partitions,
            )
            return StageResult(done, skipped=True)
        if done.get("clustering_id") != current:
            log.info(
                "partition: clusters changed (id %s -> %s); rebuilding partitions", done.get("clustering_id"), current
            )

    k = int(report["k"])
    folders = [run_dir.partition(i) for i in range(k)]
    todo = list(range(k))
    if parts > 1:
        data_manifest = data_manifest or load_manifest(run_dir.data)
        if part is None:
            return _merge(cfg, run_dir, report, data_manifest, folders)
        todo = _part_todo(cfg, folders, current, data_manifest)
        if not todo:
            log.info(f"partition: part {part} of {parts} done already; redo=true rewrites its clusters")
            return StageResult(_part_summary(run_dir, report, parts, int(part), skipped=True), skipped=True)

    assignments = load_assignments(run_dir.assignments, num_clusters=k)
    if assignments.clustering_id != current:
        raise BadInput(
            f"{run_dir.assignments} does not match {run_dir.cluster_report} (clustering_id "
            f"{assignments.clustering_id} != {current}): rerun cluster with redo=true"
        )
    data_manifest = data_manifest or load_manifest(run_dir.data)  # its absence is a MissingInput naming it
    data_sha = data_manifest.get("keys_sha256")
    if data_sha is not None and data_sha != report["keys_sha256"]:
        raise BadInput(
            f"clusters/ were made from different data (keys_sha256 {report['keys_sha256']} != "
            f"data's {data_sha}): rerun cluster with redo=true"
        )
    _check_clustering_source(run_dir, report, data_manifest)
    cache = run_dir.partitions / "verified.json" if parts == 1 else cache_path(run_dir.partitions, part, parts)
    check_recorded(run_dir.data, data_manifest, cache)

    _clear(run_dir, None if parts == 1 else [folders[i] for i in todo])
    settings = made_with(cfg)
    manifests = write_partitions(
        run_dir.data,
        data_manifest,
        assignments.keys,
        assignments.cluster,
        folders,
        current,
        min_shards=int(cfg.cluster.min_shards_per_partition),
        target_size=int(cfg.cluster.partition_shard_size),
        seed=int(cfg.seed),
        only=todo,
        extra={i: dict(settings=settings) for i in todo},  # so a merge of parts can tell one made with others
        workers=resolve_workers(cfg.data.workers),  # clusters written side by side, the same bytes either way
    )
    if parts > 1:
        log.info(
            f"partition: part {part} of {parts}: clusters {todo} sizes {[m['num_samples'] for m in manifests]} "
            f"-> {run_dir.partitions}; once every part is done, `ddm partition cluster.partition_parts={parts}` "
            f"merges"
        )
        return _part_summary(run_dir, report, parts, int(part), skipped=False)
    return _write_index(cfg, run_dir, report, data_manifest, manifests)


def _part_todo(cfg: Settings, folders: list, current: str, data_manifest: dict) -> list[int]:
    """The clusters of this part still to write: all of them under redo=true, else those not done already (a
    done one made with other settings is refused)."""
    parts, part = int(cfg.cluster.partition_parts), int(cfg.cluster.partition_part)
    mine = part_clusters(len(folders), parts, part)
    if cfg.redo:
        return mine
    done = done_clusters(folders, mine, current, shards_digest(data_manifest))
    for k, manifest in done.items():
        check_made_with(part_command(parts, part), folders[k], manifest.get("settings"), made_with(cfg))
    if done and len(done) < len(mine):
        log.info(f"partition: clusters {sorted(done)} of part {part} done already, kept")
    return [k for k in mine if k not in done]


def _part_summary(run_dir: RunDir, report: dict, parts: int, part: int, skipped: bool) -> dict:
    clusters = [run_dir.partition(k).name for k in part_clusters(int(report["k"]), parts, part)]
    return dict(
        stage="partition",
        path=str(run_dir.partitions),
        skipped=skipped,
        part=part,
        parts=parts,
        clusters=clusters,
        clustering_id=report["clustering_id"],
    )


def _merge(cfg: Settings, run_dir: RunDir, report: dict, data_manifest: dict, folders: list) -> dict:
    """The index of the clusters the parts wrote, once every one is done with these settings; copies nothing."""
    parts = int(cfg.cluster.partition_parts)
    manifests = merged_manifests(folders, parts, report["clustering_id"], shards_digest(data_manifest))
    for k, (folder, manifest) in enumerate(zip(folders, manifests)):
        check_made_with(part_command(parts, k % parts), folder, manifest.get("settings"), made_with(cfg))
    kept = {f.name for f in folders}
    for folder in sorted(run_dir.partitions.glob("cluster-*")):
        if folder.name not in kept:  # a cluster of an earlier, larger clustering: no part writes it
            shutil.rmtree(folder)
    log.info(f"partition: merging the {parts} parts of cluster.partition_parts={parts}")
    return _write_index(cfg, run_dir, report, data_manifest, manifests)


def _write_index(cfg: Settings, run_dir: RunDir, report: dict, data_manifest: dict, manifests: list[dict]) -> dict:
    """partitions/manifest.json, last: it marks partitions/ complete."""
    k, current = len(manifests), report["clustering_id"]
    summary = dict(
        clustering_id=current,
        num_clusters=k,
        method=report["method"],
        sizes=[m["num_samples"] for m in manifests],
        num_shards=[len(m["shards"]) for m in manifests],
        clusters=[run_dir.partition(i).name for i in range(k)],
        # every partition is written under the current clustering now (a grown run's index keeps older ids)
        cluster_ids=[current] * k,
        lineage={},
        # the data shards copied (a run grown by `ddm extend` appends shards: the first ones keep this digest)
        data_shards_sha256=shards_digest(data_manifest),
        data_num_shards=len(data_manifest["shards"]),
        settings=made_with(cfg),  # a rerun with other settings is refused, not skipped
    )
    write_json(run_dir.partitions / MANIFEST, summary)
    log.info(
        "partition: K=%d sizes=%s shards=%s id=%s -> %s",
        k,
        summary["sizes"],
        summary["num_shards"],
        current,
        run_dir.partitions,
    )
    return summary


def made_with(cfg: Settings) -> dict:
    """The settings the partitions depend on besides the clustering: their shard layout and the seed of
    each cluster's order."""
    c = cfg.cluster
    shards = dict(min_shards_per_partition=c.min_shards_per_partition, partition_shard_size=c.partition_shard_size)
    return dict(cluster=shards, seed=int(cfg.seed))


def _same_data(index: dict, data_manifest: dict | None) -> bool:
    """Whether the partitions were copied from data/'s shards as they are now (an index older than the
    field, or a machine without data/, says nothing: taken as the same)."""
    made_from, n = index.get("data_shards_sha256"), index.get("data_num_shards")
    if made_from is None or n is None or data_manifest is None:
        return True
    return len(data_manifest["shards"]) >= int(n) and shards_digest(data_manifest, int(n)) == made_from


def _check_clustering_source(run_dir: RunDir, report: dict, data_manifest: dict) -> None:
    """Refuse a clustering computed from other embeddings than the run's, or embeddings of other data.

    A clustering is only as much this run's as its inputs: after ``ddm embed redo=true`` (another
    encoder, or data prepared again) the old clustering's keys still match, but it no longer groups
    the run's embeddings. Reports from before ``embeddings_id`` (and cluster=random) are not checked.
    """
    made_from = report.get("embeddings_id")
    if made_from is None or not run_dir.embeddings_manifest.exists():
        return
    emb = read_json(run_dir.embeddings_manifest)
    now = embeddings_id(emb)
    if now != made_from:
        raise BadInput(
            f"{run_dir.cluster_report} was computed from embeddings {made_from}, but {run_dir.embeddings_manifest} "
            f"is now embeddings {now} (embedded again since?): recluster with `ddm cluster redo=true`, then partition"
        )
    check_embeddings_of_data(emb, data_manifest, run_dir.embeddings)


def _clear(run_dir: RunDir, folders: list | None = None) -> None:
    """Remove the old top manifest first (so partitions/ never looks complete), then every cluster-* folder, or
    only ``folders`` (a part's: another part's clusters, maybe being written now, are never touched)."""
    (run_dir.partitions / MANIFEST).unlink(missing_ok=True)
    if folders is None:
        folders = sorted(run_dir.partitions.glob("cluster-*")) if run_dir.partitions.exists() else []
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
