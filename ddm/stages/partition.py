"""Stage ``partition``: one shard set per cluster, so each expert reads only its own data.

Each cluster's samples are stored in a random order drawn from the run's
``seed`` (see ``ddm.cluster.partition``), whatever the order of data/.

Reads data/ and clusters/ (assignments.npz, report.json); writes
partitions/cluster-KK/ (shards + manifest.json recording the clustering_id) and,
last, partitions/manifest.json. A finished partitions/ is reused only while it
was made from the current clustering; after a reclustering it is rebuilt.
"""

from __future__ import annotations

import logging
import shutil

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments
from ddm.cluster.partition import write_partitions
from ddm.data.shards import MANIFEST, load_manifest
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, write_json
from ddm.stages.runner import note_skipped

log = logging.getLogger("ddm")


def run(cfg) -> dict:
    """Write partitions/cluster-KK/ for every cluster; return partitions/manifest.json's content."""
    run_dir = RunDir(cfg.run_dir)
    marker = run_dir.partitions / MANIFEST
    if not run_dir.cluster_report.exists():
        raise MissingInput(f"no clustering at {run_dir.cluster_report}: run the cluster stage first")
    report = read_json(run_dir.cluster_report)
    current = report["clustering_id"]

    if marker.exists():
        done = read_json(marker)
        if done.get("clustering_id") == current and not cfg.get("redo", False):
            note_skipped()
            log.info(
                "partition: done already (K=%d id=%s); redo=true rebuilds -> %s",
                done["num_clusters"],
                current,
                run_dir.partitions,
            )
            return done
        if done.get("clustering_id") != current:
            log.info(
                "partition: clusters changed (id %s -> %s); rebuilding partitions", done.get("clustering_id"), current
            )

    assignments = load_assignments(run_dir.assignments, num_clusters=report["k"])
    if assignments.clustering_id != current:
        raise BadInput(
            f"{run_dir.assignments} does not match {run_dir.cluster_report} (clustering_id "
            f"{assignments.clustering_id} != {current}): rerun cluster with redo=true"
        )
    data_manifest = load_manifest(run_dir.data)
    data_sha = data_manifest.get("keys_sha256")
    if data_sha is not None and data_sha != report["keys_sha256"]:
        raise BadInput(
            f"clusters/ were made from different data (keys_sha256 {report['keys_sha256']} != "
            f"data's {data_sha}): rerun cluster with redo=true"
        )

    _clear(run_dir)
    k = assignments.num_clusters
    folders = [run_dir.partition(i) for i in range(k)]
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
    )
    summary = dict(
        clustering_id=current,
        num_clusters=k,
        method=report["method"],
        sizes=[m["num_samples"] for m in manifests],
        num_shards=[len(m["shards"]) for m in manifests],
        clusters=[f.name for f in folders],
        # every partition is written under the current clustering now (a grown run's index keeps older ids)
        cluster_ids=[current] * k,
        lineage={},
    )
    write_json(marker, summary)
    log.info(
        "partition: K=%d sizes=%s shards=%s id=%s -> %s",
        k,
        summary["sizes"],
        summary["num_shards"],
        current,
        run_dir.partitions,
    )
    return summary


def _clear(run_dir: RunDir) -> None:
    """Remove the old top manifest first (so partitions/ never looks complete), then every cluster-* folder."""
    (run_dir.partitions / MANIFEST).unlink(missing_ok=True)
    if run_dir.partitions.exists():
        for folder in sorted(run_dir.partitions.glob("cluster-*")):
            shutil.rmtree(folder)
