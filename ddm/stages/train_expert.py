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
import time

import lightning as L
import torch
from omegaconf import OmegaConf

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, sample_stream
from ddm.data.shards import load_manifest, shard_paths
from ddm.io import read_json, write_json
from ddm.models.dit import count_params
from ddm.stages.runner import skip
from ddm.train.export import save_weights
from ddm.train.modules import ExpertModule
from ddm.train.records import FailureRecord, clear_failure
from ddm.train.signals import PreemptionGuard
from ddm.train.trainer import (JobState, build_logger, build_trainer, fit_job, forward_flops, hardware,
                               last_checkpoint, per_device_batch)

log = logging.getLogger("ddm")


def model_config(cfg_model, meta: dict) -> dict:
    """The network's arguments: its size from the config, its input shape from the data it trains on."""
    return dict(size=cfg_model.size, image_size=int(meta["image_size"]), in_channels=int(meta["channels"]),
                num_classes=int(meta["num_classes"]))


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
    if cfg.get("redo", False) and job_dir.exists():
        shutil.rmtree(job_dir)

    part_dir = rd.partition(k)
    if not (part_dir / "manifest.json").exists():
        raise FileNotFoundError(
            f"expert.id={k}: no partition at {part_dir} (run `ddm partition` first, or check that "
            f"expert.id is below the number of clusters)")
    manifest = load_manifest(part_dir)
    if int(manifest["cluster"]) != k:
        raise ValueError(f"{part_dir}/manifest.json says cluster {manifest['cluster']}, expected {k}")

    with PreemptionGuard() as guard, FailureRecord(job_dir, f"expert-{k:02d}") as failure:
        return _train(cfg, rd, k, manifest, guard, failure)


def _check_still_current(record: dict, rd: RunDir, k: int) -> None:
    """A finished expert of an older clustering must not pass for one of the current partitions."""
    path = rd.partition_manifest(k)
    if not path.exists():
        return
    current = read_json(path)
    if (record.get("clustering_id"), record.get("partition_keys_sha256")) != \
            (current.get("clustering_id"), current.get("keys_sha256")):
        raise ValueError(
            f"{rd.expert_record(k)} was trained on clustering {record.get('clustering_id')} but "
            f"{path} is now clustering {current.get('clustering_id')} (or other keys): retrain it with "
            f"`ddm train-expert expert.id={k} redo=true`")


def _train(cfg, rd: RunDir, k: int, manifest: dict, guard, failure) -> dict:
    job_dir = rd.expert(k)
    start = time.time()
    L.seed_everything(int(cfg.seed) + 1000 * k, workers=True, verbose=False)
    ex = cfg.expert
    identity = dict(job=f"expert-{k:02d}", clustering_id=manifest["clustering_id"],
                    partition_keys_sha256=manifest["keys_sha256"])
    module = ExpertModule(model=model_config(cfg.model, manifest), flow=OmegaConf.to_container(cfg.flow),
                          lr=ex.lr, weight_decay=ex.weight_decay, warmup_steps=ex.warmup_steps,
                          total_steps=ex.steps, label_dropout=ex.label_dropout, ema_decay=ex.ema_decay,
                          expert_id=k)
    logger = build_logger(cfg.logger, job_dir, cfg.run_dir, f"expert-{k:02d}")
    state = JobState(identity, started=start)
    trainer = build_trainer(cfg.island, job_dir, ex.steps, ex.ckpt_every, logger, ex.log_every,
                            ex.keep_checkpoints, guard=guard, state=state)
    failure.trainer = trainer
    batch = per_device_batch(int(ex.batch_size), trainer, "expert")
    urls = shard_paths(rd.partition(k), manifest, url=ex.get("shard_url"))
    stream = sample_stream(urls, int(manifest["channels"]),
                           seed=int(cfg.seed) + 1000 * k, shuffle_buffer=ex.shuffle_buffer)
    loader = batch_loader(stream, batch, int(cfg.island.num_workers))
    resume = last_checkpoint(job_dir, identity)
    if resume:
        log.info("train-expert %d: resuming from %s", k, resume)
    fit_job(trainer, module, loader, resume, guard, bool(ex.get("requeue", True)), f"train-expert {k}")

    if trainer.global_rank != 0:
        return {}
    net = module.ema
    x = torch.zeros(1, net.trunk.in_channels, net.trunk.image_size, net.trunk.image_size)
    flops = forward_flops(net, (x, torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    steps = int(trainer.global_step)
    record = dict(
        expert_id=k, num_experts=int(manifest["num_clusters"]), clustering_id=manifest["clustering_id"],
        partition_keys_sha256=manifest["keys_sha256"], partition_samples=int(manifest["num_samples"]),
        steps=steps, batch_size=int(ex.batch_size), samples_seen=steps * int(ex.batch_size),
        final_loss=module.recent_loss, params=count_params(net), forward_flops_per_sample=flops,
        # training FLOPs: forward + backward ~ 3x forward, per sample seen
        train_flops=3 * flops * steps * int(ex.batch_size),
        # over every attempt, each counted up to the checkpoint it left (see JobState)
        wall_s=round(state.wall_s(), 1), wall_s_this_attempt=round(time.time() - start, 1),
        attempts=state.attempts, resumed_from=str(resume) if resume else None,
        resumed_from_step=state.resumed_step,
        hardware=dict(hardware(), world_size=trainer.world_size, strategy=type(trainer.strategy).__name__,
                      per_device_batch=batch, accumulate_grad_batches=trainer.accumulate_grad_batches),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    save_weights(rd.expert_weights(k), "expert", net, module.path.config(), expert_id=k,
                 num_experts=record["num_experts"], clustering_id=record["clustering_id"], steps=steps)
    write_json(rd.expert_record(k), record)
    clear_failure(job_dir)
    log.info("train-expert %d: %d steps on %d samples, loss %.4f, %.0fs -> %s", k, steps,
             record["partition_samples"], record["final_loss"] or float("nan"), record["wall_s"], job_dir)
    return record
