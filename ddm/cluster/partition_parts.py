"""partitions/ written by separate jobs: ``cluster.partition_parts`` shares of the clusters, merged when all are done.

Part ``j`` of ``N`` writes whole clusters, ``j, j+N, j+2N, ...``, into their own folders and
nothing else: not another part's folders, not ``partitions/manifest.json``. Every part
starts at once, so each keeps its own record of the data shards it checked
(``verified-part-JJJJ-of-NNNN.json``) rather than race on one file. A cluster is done when
its manifest, written last when its shards are whole, names the current clustering and the
current data shards: so the clusters' manifests are the parts' records, and the merge
(``partition_parts=N``, no ``partition_part``) copies nothing. It checks that every cluster
is done with the same settings, every shard of it on disk, and writes the index.

Why every N-th cluster and not a contiguous range (as prepare's parts are): clusters are
numbered by decreasing size, so a range would give part 0 the largest clusters and the last
part the smallest. Dealt in turn, each part takes one cluster of every N in size order, and
two parts differ by at most the gap between the largest and the smallest cluster.

Each part reads all of ``data/``: data/ is stored in a seeded permutation, so every data
shard holds samples of nearly every cluster, and each part checks every data shard
against its checksum (N parts hash data/ N times; a part run again rereads only what changed).
"""

from __future__ import annotations

from pathlib import Path

from ddm.data.shards import MANIFEST
from ddm.errors import BadInput, MissingInput, some_of
from ddm.io import read_json


def check_parts(parts: int, part: int | None, num_clusters: int) -> None:
    if int(parts) < 1:
        raise BadInput(
            f"cluster.partition_parts={parts}: give the number of jobs that write partitions/ (1: this job alone)"
        )
    if int(parts) > num_clusters:
        raise BadInput(
            f"cluster.partition_parts={parts} is more than the {num_clusters} clusters (a part writes whole "
            f"clusters): give at most {num_clusters}"
        )
    if part is not None and not 0 <= int(part) < int(parts):
        raise BadInput(
            f"cluster.partition_part={part} is not one of the {parts} parts: give 0..{int(parts) - 1}, or null"
        )


def part_clusters(num_clusters: int, parts: int, part: int) -> list[int]:
    """The clusters part ``part`` of ``parts`` writes: every ``parts``-th, from ``part`` (see the module docstring)."""
    return list(range(int(part), num_clusters, int(parts)))


def part_command(parts: int, part: int | str) -> str:
    """The stage and overrides that run one part: ``partition cluster.partition_parts=4 cluster.partition_part=2``."""
    return f"partition cluster.partition_parts={parts} cluster.partition_part={part}"


def cache_path(partitions: Path, part: int, parts: int) -> Path:
    """Where part ``part`` records the data shards it checked (``ddm.data.verified``): a file of its own."""
    return Path(partitions) / f"verified-part-{int(part):04d}-of-{int(parts):04d}.json"


def _why_not_done(folder: Path, clustering_id: str, data_digest: str) -> str | None:
    """None when cluster ``folder`` is done under this clustering, from these data shards; else what it lacks."""
    path = folder / MANIFEST
    if not path.exists():
        return f"{folder} holds no {MANIFEST}"
    manifest = read_json(path)
    if manifest.get("clustering_id") != clustering_id:
        return f"{path} is of clustering {manifest.get('clustering_id')}, not {clustering_id}"
    if manifest.get("data_shards_sha256") != data_digest:
        return f"{path} was copied from other data shards than data/'s"
    return None


def done_clusters(folders: list[Path], clusters, clustering_id: str, data_digest: str) -> dict[int, dict]:
    """The manifests of the ``clusters`` done already (see ``_why_not_done``), by cluster id."""
    return {
        k: read_json(folders[k] / MANIFEST)
        for k in clusters
        if _why_not_done(folders[k], clustering_id, data_digest) is None
    }


def merged_manifests(folders: list[Path], parts: int, clustering_id: str, data_digest: str) -> list[dict]:
    """Every cluster's manifest, each checked to be done and its shards on disk; reads no image.

    Raises ``MissingInput`` naming the parts not done and the command that writes them."""
    why = {k: _why_not_done(f, clustering_id, data_digest) for k, f in enumerate(folders)}
    missing = sorted({k % parts for k, reason in why.items() if reason is not None})
    if missing:
        shown = some_of(missing)
        first = next(reason for reason in why.values() if reason is not None)
        raise MissingInput(
            f"partition: parts {shown} of cluster.partition_parts={parts} are not done ({first}): run "
            f"`ddm {part_command(parts, 'J')}` for each (J = {shown}), then this command again to merge"
        )
    manifests = [read_json(f / MANIFEST) for f in folders]
    for k, (folder, manifest) in enumerate(zip(folders, manifests)):
        for shard in manifest["shards"]:
            if not (folder / shard["path"]).is_file():
                raise MissingInput(
                    f"{folder / shard['path']}, listed in {folder / MANIFEST}, is missing: rerun its part with "
                    f"`ddm {part_command(parts, k % parts)} redo=true`"
                )
    return manifests
