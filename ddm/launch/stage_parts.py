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

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.settings import Settings

MERGE = "merge"


def _parts(setting) -> int:
    return 1 if setting is None else int(setting)


def _every_part(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    return list(range(parts)) if parts > 1 else []


def _all_done(cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
    return set(ids) <= set(done)


@dataclass(frozen=True)
class StageParts:
    """One stage as jobs: which setting picks a task's share, how many there are, how a finished one is seen."""

    stage: str  # the `ddm` command, and the folder of its jobs' logs: logs/<stage>/
    part_key: str  # the override a task is started with: <part_key>=<task id>
    count_key: str | None  # the setting that says how many parts; None: one task per cluster
    workers_key: str | None  # the worker processes a job starts: local jobs side by side share the cores through
    # it; None: the job has none (its threads follow the plan's OMP_NUM_THREADS)
    gpu: bool  # its tasks (or the one job of a stage in one part) ask for the island's GPUs
    what: str  # what array task j does, for its script's header
    folder: Callable[[RunDir], Path]  # what the stage writes: started once it exists
    needs: Callable[[RunDir], str | None]  # what is missing before it can run, None: nothing
    count: Callable[[Settings, RunDir], int]  # the number of parts (encode: K), checked
    done: Callable[[Settings, RunDir, int], list[int]]  # the tasks done (of count parts)
    record: Callable[[RunDir, int, int], Path]  # a file task j of n leaves when it ends well
    records: str | None  # the glob, under the run, of the parts' own files: how many, when not given
    merge: bool = True  # a last job joins the parts
    ids: Callable[[Settings, RunDir, int], list[int]] = _every_part  # the tasks to consider
    complete: Callable[[Settings, RunDir, list[int], list[int]], bool] | None = None  # (ids, done): nothing left
    # to start; None: once the output is there
    task_prefix: str = "part-"  # a task's log folder, logs/<stage>/<prefix><id padded to task_digits>
    task_digits: int = 4
    lock: Callable[[RunDir, int], Path] | None = None  # the folder whose lock.json a running task holds
    output_name: str = "manifest.json"  # the file the merge (or the one job) writes last in the stage's folder

    def output(self, rd: RunDir) -> Path | None:
        """The manifest the merge (or the one job) writes last in the stage's folder; None without a merge."""
        return self.folder(rd) / self.output_name if self.merge else None

    def is_complete(self, cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
        return self.output(rd).exists() if self.complete is None else self.complete(cfg, rd, ids, done)

    @property
    def array_job(self) -> str:
        """The SLURM name of its array (``ddm.launch.naming``): ``prepare-parts``; ``encode``, without a merge."""
        return f"{self.stage}-parts" if self.merge else self.stage

    @property
    def final_name(self) -> str | None:
        """The SLURM name of the job that completes the stage (its merge): the stage's; None without a merge."""
        return self.stage if self.merge else None

    def final_job(self, parts: int) -> str | None:
        """The job that completes the stage: the ``merge`` of the parts, the stage itself in one part, or none."""
        if not self.merge:
            return None
        return MERGE if int(parts) > 1 else self.stage

    def task_job(self, task: int) -> str:
        """``part-0003`` or ``cluster-03``: a task's name and its log folder under ``logs/<stage>/``."""
        return f"{self.task_prefix}{int(task):0{self.task_digits}d}"

    def recorded_parts(self, rd: RunDir) -> int | None:
        """The number of parts the files of parts already there were written for, when they all agree."""
        if self.records is None:
            return None
        counts = {int(m.group(1)) for p in rd.root.glob(self.records) if (m := _OF.search(p.name))}
        return counts.pop() if len(counts) == 1 else None


_OF = re.compile(r"-of-(\d+)\.json$")


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
    count=lambda cfg, rd: _parts(cfg.data.parts),
    done=lambda cfg, rd, parts: [j for j in range(parts) if parts > 1 and _prepare_record(rd, j, parts).exists()],
    record=_prepare_record,
    records="data/parts/part-*-of-*.json",
)


# -- embed


def _embed_count(cfg: Settings, rd: RunDir) -> int:
    from ddm.embed.parts import check_parts

    check_parts(_parts(cfg.embed.parts), None)
    return _parts(cfg.embed.parts)


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
    complete=_all_done,
    record=lambda rd, k, n: rd.latent(k) / "manifest.json",
    records=None,
    lock=_encode_lock,
)


# -- sample


def _sample_expect(cfg: Settings, rd: RunDir) -> dict:
    from ddm.sampling.checkpoints import models_identity
    from ddm.sampling.draw import requested_settings

    return dict(settings=requested_settings(cfg.sample), models=models_identity(rd))


def _sample_done(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    """The parts whose record is there, drawn with the settings and models asked for now."""
    if parts < 2:
        return []
    from ddm.sampling.parts import part_done

    expect = _sample_expect(cfg, rd)
    return [j for j in range(parts) if part_done(rd.samples, j, parts, expect) is not None]


def _samples_current(cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
    """samples/record.json is there, drawn with the settings and models asked for now."""
    if not rd.samples_record.exists():
        return False
    record = read_json(rd.samples_record)
    return all(record.get(k) == v for k, v in _sample_expect(cfg, rd).items())


def _sample_count(cfg: Settings, rd: RunDir) -> int:
    from ddm.sampling.parts import check_parts

    return check_parts(cfg.sample.parts, None)[0]


def _sample_record(rd: RunDir, part: int, parts: int) -> Path:
    from ddm.sampling.parts import part_files

    return part_files(rd.samples, part, parts)[1]


def _sample_needs(rd: RunDir) -> str | None:
    if rd.router_weights.exists() or rd.distilled_weights.exists():
        return None
    return f"no {rd.router_weights}: train the experts and the router first"


SAMPLE = StageParts(
    stage="sample",
    part_key="sample.part",
    count_key="sample.parts",
    workers_key=None,
    gpu=True,
    what="draws part j of the samples (samples/parts/part-JJJJ-of-NNNN.json marks it done)",
    folder=lambda rd: rd.samples,
    needs=_sample_needs,
    count=_sample_count,
    done=_sample_done,
    complete=_samples_current,
    record=_sample_record,
    records="samples/parts/part-*-of-*.json",
    output_name="record.json",
)

STAGES = {s.stage: s for s in (PREPARE, EMBED, PARTITION, ENCODE, SAMPLE)}
