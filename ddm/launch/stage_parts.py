"""What ``ddm submit submit.stage=<stage>`` needs to know of each stage that runs as many jobs: one row each.

A stage's jobs are array tasks, each started with one setting that selects its share (``data.part=J``,
``vae.clusters=K``) and every other override of the ``ddm submit`` call; a stage with a merge then has one more job
that joins the parts (the same command without that setting). ``ddm.launch.stage_jobs`` starts them from these rows
alone:

========= ======================== ========================= ===================================== ======= =======
stage     a task's setting         how many                  a task is done when                   GPU     merge
========= ======================== ========================= ===================================== ======= =======
prepare   data.part                data.parts                data/parts/part-JJJJ-of-NNNN.json     no      yes
embed     embed.part               embed.parts               its record, and every data shard of   parts   yes
                                                             its range has its emb and keys files
partition cluster.partition_part   cluster.partition_parts   every cluster it owns (J, J+N, ...)   no      yes
                                                             has a manifest of the clustering
encode    vae.clusters             K (the clusters)          latents/cluster-KK/manifest.json of   yes     no
                                                             the cluster's partition
sample    sample.part              sample.parts              samples/parts/part-JJJJ-of-NNNN.json  yes     yes
                                                             of the settings and models asked for
========= ======================== ========================= ===================================== ======= =======

With one part (``data.parts=1``, the default) there is no array: one job runs the whole stage, on the parts'
resources. A merge reads no image and runs on CPUs. Each cluster's latents are complete on their own, so encode
has no merge, and a cluster whose encode lock (``latents/cluster-KK.encode/lock.json``) is held by a live job is
left to it, as an expert's is. Nothing here imports torch: what reads a stage's files is imported where called.
"""

from __future__ import annotations

from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.launch.sample_parts import SAMPLE
from ddm.launch.stage_spec import StageParts, all_done, parts_of
from ddm.settings import Settings

# -- prepare


def _prepare_record(rd: RunDir, part: int, parts: int) -> Path:
    from ddm.data.ingest.parts import part_path  # torch comes with the sources' package

    return part_path(rd.data, part, parts)


PREPARE = StageParts(
    stage="prepare",
    part_key="data.part",
    count_key="data.parts",
    workers_key="data.workers",
    gpu=False,
    what="writes part j of data/ (data/parts/part-JJJJ-of-NNNN.json marks it done)",
    folder=lambda rd: rd.data,
    needs=lambda rd: None,
    count=lambda cfg, rd: parts_of(cfg.data.parts),
    done=lambda cfg, rd, parts: [j for j in range(parts) if parts > 1 and _prepare_record(rd, j, parts).exists()],
    record=_prepare_record,
    records="data/parts/part-*-of-*.json",
)


# -- embed


def _embed_count(cfg: Settings, rd: RunDir) -> int:
    from ddm.embed.parts import check_parts

    check_parts(parts_of(cfg.embed.parts), None)
    return parts_of(cfg.embed.parts)


def _embed_record(rd: RunDir, part: int, parts: int) -> Path:
    from ddm.embed.parts import record_path

    return record_path(rd.embeddings, part, parts)


def _embed_done(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    """The parts whose record is there and every data shard of whose range has its files (the .npy last)."""
    from ddm.embed import embedding_file, keys_file

    def whole(record: Path) -> bool:
        span = read_json(record)
        return all(
            (rd.embeddings / name).exists()
            for i in range(int(span["start"]), int(span["stop"]))
            for name in (keys_file(i), embedding_file(i))
        )

    return [j for j in range(parts) if parts > 1 and (r := _embed_record(rd, j, parts)).exists() and whole(r)]


EMBED = StageParts(
    stage="embed",
    part_key="embed.part",
    count_key="embed.parts",
    workers_key="embed.workers",
    gpu=True,
    what="embeds the data shards of part j (embeddings/parts/part-JJJJ-of-NNNN.json records which)",
    folder=lambda rd: rd.embeddings,
    needs=lambda rd: None if rd.data_manifest.exists() else f"no {rd.data_manifest}: prepare data/ first",
    count=_embed_count,
    done=_embed_done,
    record=_embed_record,
    records="embeddings/parts/part-*-of-*.json",
)


# -- partition


def _clusters(rd: RunDir) -> int:
    return int(read_json(rd.cluster_report)["k"])


def _partition_count(cfg: Settings, rd: RunDir) -> int:
    from ddm.cluster.partition_parts import check_parts

    check_parts(int(cfg.cluster.partition_parts), None, _clusters(rd))
    return int(cfg.cluster.partition_parts)


def _partition_done(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    """The parts every cluster of which has a manifest of the current clustering, copied from data/'s shards."""
    if parts < 2:
        return []
    from ddm.cluster.partition_parts import done_clusters, part_clusters
    from ddm.data.shards import load_manifest, shards_digest

    report, k = read_json(rd.cluster_report), _clusters(rd)
    digest = shards_digest(load_manifest(rd.data))
    done = done_clusters([rd.partition(i) for i in range(k)], range(k), report["clustering_id"], digest)
    return [j for j in range(parts) if all(i in done for i in part_clusters(k, parts, j))]


def _partitions_current(rd: RunDir) -> bool:
    """partitions/manifest.json is there, of the clustering clusters/report.json holds."""
    if not (rd.partitions_index.exists() and rd.cluster_report.exists()):
        return False
    return read_json(rd.partitions_index).get("clustering_id") == read_json(rd.cluster_report)["clustering_id"]


PARTITION = StageParts(
    stage="partition",
    part_key="cluster.partition_part",
    count_key="cluster.partition_parts",
    workers_key="data.workers",
    gpu=False,
    what="writes clusters j, j+N, j+2N, ... of partitions/ (each cluster's manifest marks it done)",
    folder=lambda rd: rd.partitions,
    needs=lambda rd: None if rd.cluster_report.exists() else f"no {rd.cluster_report}: run `ddm cluster` first",
    count=_partition_count,
    done=_partition_done,
    complete=lambda cfg, rd, ids, done: _partitions_current(rd),
    # a part's first cluster is its own (J < N <= K), whole once the part ended well
    record=lambda rd, part, parts: rd.partition_manifest(part),
    records="partitions/verified-part-*-of-*.json",
)


# -- encode


def _encode_count(cfg: Settings, rd: RunDir) -> int:
    if str(cfg.vae.kind) == "none":
        raise BadInput("submit.stage=encode with vae=none: a pixel run has nothing to encode; give vae=sd ...")
    return int(read_json(rd.partitions_index)["num_clusters"])


def _encode_ids(cfg: Settings, rd: RunDir, k: int) -> list[int]:
    from ddm.launch.encode_job import selected_clusters

    return selected_clusters(cfg.vae.clusters, k)


def _encoded(rd: RunDir, k: int) -> bool:
    """Cluster ``k``'s latents are there, of its partition as it is now (the same clustering and keys)."""
    made, source = rd.latent(k) / "manifest.json", rd.partition_manifest(k)
    if not (made.exists() and source.exists()):
        return False
    latents, partition = read_json(made), read_json(source)
    return all(latents.get(key) == partition.get(key) for key in ("clustering_id", "keys_sha256"))


def _encode_lock(rd: RunDir, k: int) -> Path:
    from ddm.launch.encode_job import job_folder

    return job_folder(rd, k)


ENCODE = StageParts(
    stage="encode",
    part_key="vae.clusters",
    count_key=None,
    workers_key="vae.workers",
    gpu=True,
    merge=False,
    task_prefix="cluster-",
    task_digits=2,  # as latents/cluster-KK
    what="encodes cluster j into latents/cluster-JJ/ (its manifest.json marks it done)",
    folder=lambda rd: rd.latents,
    needs=lambda rd: None if _partitions_current(rd) else f"no current {rd.partitions_index}: partition first",
    count=_encode_count,
    ids=_encode_ids,
    done=lambda cfg, rd, k: [i for i in range(k) if _encoded(rd, i)],
    complete=all_done,
    record=lambda rd, k, n: rd.latent(k) / "manifest.json",
    records=None,
    lock=_encode_lock,
)


STAGES = {s.stage: s for s in (PREPARE, EMBED, PARTITION, ENCODE, SAMPLE)}
