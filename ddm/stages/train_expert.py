"""Stage ``train-expert``: train expert ``expert.id`` on its own partition, in isolation.

Reads only ``partitions/cluster-<id>/``; writes only ``experts/expert-<id>/``.
No process group, lock or file is shared with another expert: inside the
island Lightning may use DDP/FSDP across the island's own devices, nothing more.
Resumes from the newest complete checkpoint (``checkpoints/last.ckpt`` or a
``step-*.ckpt``); on SIGUSR1/SIGTERM it saves ``last.ckpt`` and requeues its
SLURM job (``expert.requeue``) or exits non-zero; when training raises it writes
``failed.json``. The finished expert is ``expert.pt`` (EMA weights) plus
``record.json``, written last; a finished expert is never trained again
(unless ``redo=true``).
"""

from __future__ import annotations

import logging
import shutil

from omegaconf import OmegaConf

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, sample_stream
from ddm.data.shards import load_manifest, shard_paths, verify
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.jobs import expert_job
from ddm.seeds import data_stream_seed, expert_seed
from ddm.stages.runner import skip
from ddm.train.job import Job, Schedule, Trained, run_job
from ddm.train.lock import check_free, is_global_rank_zero
from ddm.train.modules import ExpertModule

log = logging.getLogger("ddm")


def model_config(cfg_model, meta: dict) -> dict:
    """The network's arguments: its size from the config, its input shape from the data it trains on."""
    return dict(
        size=cfg_model.size,
        image_size=int(meta["image_size"]),
        in_channels=int(meta["channels"]),
        num_classes=int(meta["num_classes"]),
    )


def run(cfg) -> dict:
    """Train expert ``cfg.expert.id``; return its record (at once if it is already finished).

    Survives faults: resumes from the newest complete checkpoint, saves and
    requeues (or exits non-zero) on SIGUSR1/SIGTERM, and writes ``failed.json``
    when training raises.
    """
    rd = RunDir(cfg.run_dir)
    k = int(cfg.expert.id)
    job_dir = rd.expert(k)
    if skip(rd.expert_record(k), cfg):
        record = read_json(rd.expert_record(k))
        _check_still_current(record, rd, k)
        log.info("train-expert %d: already done (%d steps) -> %s", k, record["steps"], job_dir)
        return record
    # Only global rank 0 starts over: the other ranks of a DDP job run this too, beside it.
    if cfg.get("redo", False) and job_dir.exists() and is_global_rank_zero():
        check_free(job_dir, f"train-expert {k} redo=true")  # never delete the folder of a job that still runs
        shutil.rmtree(job_dir)

    part_dir = rd.partition(k)
    if not rd.partition_manifest(k).exists():
        raise MissingInput(
            f"expert.id={k}: no partition at {part_dir} (run `ddm partition` first, or check that "
            f"expert.id is below the number of clusters)"
        )
    # Shards travel between islands and people: train only on what the partition stage recorded.
    # (Streamed shards, expert.shard_url, are not read twice to check them.)
    manifest = load_manifest(part_dir) if cfg.expert.get("shard_url") else verify(part_dir)
    if int(manifest["cluster"]) != k:
        raise BadInput(
            f"{part_dir}/manifest.json says cluster {manifest['cluster']}, expected {k}: rerun "
            f"`ddm partition redo=true`"
        )

    record = run_job(_job(cfg, rd, k, manifest), lambda trained: _record(trained, k, manifest))
    if record:
        log.info(
            "train-expert %d: %d steps on %d samples, loss %.4f, %.0fs -> %s",
            k,
            record["steps"],
            record["partition_samples"],
            record["final_loss"] or float("nan"),
            record["wall_s"],
            job_dir,
        )
    return record


def _check_still_current(record: dict, rd: RunDir, k: int) -> None:
    """A finished expert of an older clustering must not pass for one of the current partitions."""
    path = rd.partition_manifest(k)
    if not path.exists():
        return
    current = read_json(path)
    if (record.get("clustering_id"), record.get("partition_keys_sha256")) != (
        current.get("clustering_id"),
        current.get("keys_sha256"),
    ):
        raise BadInput(
            f"{rd.expert_record(k)} was trained on clustering {record.get('clustering_id')} but "
            f"{path} is now clustering {current.get('clustering_id')} (or other keys): retrain it with "
            f"`ddm train-expert expert.id={k} redo=true`"
        )


def _job(cfg, rd: RunDir, k: int, manifest: dict) -> Job:
    """Expert ``k``'s training job: its own partition, seed and folder, nothing shared with another expert."""
    ex = cfg.expert
    seed = expert_seed(cfg.seed, k)

    def build_module() -> ExpertModule:
        return ExpertModule(
            model=model_config(cfg.model, manifest),
            flow=OmegaConf.to_container(cfg.flow),
            lr=ex.lr,
            weight_decay=ex.weight_decay,
            warmup_steps=ex.warmup_steps,
            total_steps=ex.steps,
            label_dropout=ex.label_dropout,
            ema_decay=ex.ema_decay,
            expert_id=k,
        )

    def build_loader(batch: int, start_step: int):
        # Inside the job: a bad shard_url is a failure of this job, recorded in its failed.json.
        urls = shard_paths(rd.partition(k), manifest, url=ex.get("shard_url"))
        stream = sample_stream(
            urls, int(manifest["channels"]), seed=data_stream_seed(seed, start_step), shuffle_buffer=ex.shuffle_buffer
        )
        return batch_loader(stream, batch, int(cfg.island.num_workers))

    return Job(
        name=expert_job(k),
        title=f"train-expert {k}",
        folder=rd.expert(k),
        identity=dict(
            job=expert_job(k), clustering_id=manifest["clustering_id"], partition_keys_sha256=manifest["keys_sha256"]
        ),
        seed=seed,
        build_module=build_module,
        build_loader=build_loader,
        schedule=Schedule.from_config("expert", ex),
        island=cfg.island,
        logger=cfg.logger,
        run_dir=rd.root,
        weights=rd.expert_weights(k),
        record=rd.expert_record(k),
        export_meta=dict(
            expert_id=k,
            num_experts=int(manifest["num_clusters"]),
            clustering_id=manifest["clustering_id"],
            # guidance needs the null label trained: the sampler refuses cfg_scale != 1 when this is 0
            label_dropout=float(ex.label_dropout),
        ),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _record(trained: Trained, k: int, manifest: dict) -> dict:
    """The common fields plus the partition the expert trained on; hardware adds how the island split the job."""
    return dict(
        expert_id=k,
        num_experts=int(manifest["num_clusters"]),
        clustering_id=manifest["clustering_id"],
        partition_keys_sha256=manifest["keys_sha256"],
        partition_samples=int(manifest["num_samples"]),
        **trained.common_record(parallelism=True),
    )
