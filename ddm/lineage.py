"""Which clustering each cluster's partition (and so its expert) belongs to, in a run that grew.

A fresh clustering writes every partition under its own ``clustering_id``. When
``ddm extend`` grows a run, the clustering gets a new id whose ``parent`` is the
old one, and only the clusters whose members changed are written again; the
others keep their shard sets, manifests and experts, which name the clustering
they were made under. The partition index (``partitions/manifest.json``) and the
router's record say, per cluster, which id that is (``cluster_ids``) and how many
clusters each id of the lineage had (``lineage``: id -> K), so an artefact made
under an ancestor is accepted for exactly the clusters it was made for, and one
from any other clustering is still refused::

    ids = cluster_ids(index)            # ["a1..", "a1..", "b7.."]: clusters 0, 1 kept, 2 new
    check_member(meta, k, index, where) # raises BadInput unless meta was made for cluster k
    check_partition(manifest, k, report, where, source)  # the same for a partition's manifest
"""

from __future__ import annotations

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json


def cluster_ids(record: dict) -> list[str]:
    """Per cluster, the clustering id its partition was written under (all the current id unless the run grew)."""
    k = int(record["num_clusters"] if "num_clusters" in record else record["num_experts"])
    ids = record.get("cluster_ids")
    if ids is None:
        return [record["clustering_id"]] * k
    if len(ids) != k:
        raise BadInput(
            f"a record of clustering {record['clustering_id']} lists {len(ids)} cluster ids for K={k} clusters: "
            f"it is inconsistent; rerun `ddm partition redo=true`"
        )
    return list(ids)


def lineage_sizes(record: dict) -> dict[str, int]:
    """id -> K for the current clustering and each ancestor a kept cluster was made under."""
    k = int(record["num_clusters"] if "num_clusters" in record else record["num_experts"])
    return {**{str(i): int(n) for i, n in (record.get("lineage") or {}).items()}, record["clustering_id"]: k}


def lineage_fields(report: dict) -> dict:
    """The fields a partition index or a router copies from the clustering report: cluster_ids, lineage."""
    return dict(cluster_ids=cluster_ids(dict(report, num_clusters=report["k"])), lineage=report.get("lineage") or {})


def check_member(meta: dict, k: int, record: dict, where) -> None:
    """Refuse ``meta`` (an expert's expert.pt or record) unless it was made for cluster ``k`` of ``record``'s lineage.

    ``record``: the partition index or the router's metadata (clustering_id,
    num_clusters or num_experts, and for a grown run cluster_ids and lineage).
    """
    expected = cluster_ids(record)[k]
    made = meta.get("clustering_id")
    if made != expected:
        current = record["clustering_id"]
        belongs = (
            f"the run is clustering {current}"
            if expected == current
            else f"cluster {k} of clustering {current} was kept from clustering {expected} when the run grew"
        )
        raise BadInput(
            f"{where} was trained on clustering {made}, but {belongs}: retrain it with "
            f"`ddm train-expert expert.id={k} redo=true`, or use the run it belongs to"
        )
    k_then = lineage_sizes(record).get(expected)
    if k_then is not None and meta.get("num_experts") is not None and int(meta["num_experts"]) != k_then:
        raise BadInput(
            f"{where} says K={meta['num_experts']} clusters, but clustering {expected} had K={k_then}: the file is "
            f"inconsistent; retrain it with `ddm train-expert expert.id={k} redo=true`"
        )


def check_partition(manifest: dict, k: int, record: dict, where, source) -> None:
    """Refuse a partition's ``manifest`` unless it is cluster ``k`` of ``record``'s clustering (or the ancestor kept).

    ``record``: the run's clustering report (with ``num_clusters``) or its partition index, read from
    ``source``. A partition can be whole (every checksum right) and still come from another run or an
    older clustering with the same cluster number: its ``clustering_id`` tells.
    """
    ids = cluster_ids(record)
    current = record["clustering_id"]
    if k >= len(ids):
        raise BadInput(
            f"{where} is cluster {k}, but this run's clustering {current} ({source}) has K={len(ids)} clusters: "
            f"the partition is left from another clustering; remake the partitions with `ddm partition redo=true`"
        )
    expected, made = ids[k], manifest.get("clustering_id")
    if made != expected:
        belongs = f"clustering {expected}" if expected == current else f"clustering {expected} (kept in {current})"
        raise BadInput(
            f"{where} belongs to clustering {made}, but cluster {k} of this run ({source}) is {belongs}: its shards "
            f"were made from another clustering or copied from another run; remake them from this run's clusters "
            f"with `ddm partition redo=true` (then, in a latent run, `ddm encode`)"
        )
    k_then = lineage_sizes(record).get(expected)
    if k_then is not None and manifest.get("num_clusters") is not None and int(manifest["num_clusters"]) != k_then:
        raise BadInput(
            f"{where} says K={manifest['num_clusters']} clusters, but clustering {expected} had K={k_then} ({source}): "
            f"the manifest is inconsistent; remake it with `ddm partition redo=true`"
        )


def check_partition_of_run(rd: RunDir, k: int, manifest: dict) -> None:
    """Refuse a partition made from another clustering than the run's (a whole shard set copied from another run).

    The run's clustering is ``clusters/report.json``; an island that was sent only partitions/ has
    the partition index. With neither, a partition travelling alone has nothing to be checked against.
    """
    if rd.cluster_report.exists():
        report = read_json(rd.cluster_report)
        record, source = dict(report, num_clusters=int(report["k"])), rd.cluster_report
    elif rd.partitions_index.exists():
        record, source = read_json(rd.partitions_index), rd.partitions_index
    else:
        return
    check_partition(manifest, k, record, rd.partition_manifest(k), source)
