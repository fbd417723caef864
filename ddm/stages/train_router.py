"""Stage ``train-router``: a classifier of which cluster a noisy sample came from.

Trained with cross-entropy against the cluster of the clean sample that the
shared ``FlowPath`` noised, over (a fraction of) every partition, drawn in
proportion to cluster size so its optimum is the posterior p(k | x_t, t, y).
Needs no expert. The first shard of each partition (when it has more than one)
is held out to measure accuracy in buckets of t.

Faults are handled as for an expert (see ``ddm.stages.train_expert``):
resume from the newest complete checkpoint, save and requeue on a signal,
``router/failed.json`` when training raises.
"""
from __future__ import annotations

import logging
import math
import shutil
import time

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, mixed_stream
from ddm.images import to_model_space
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.flow import FlowPath
from ddm.io import read_json, write_json
from ddm.models.dit import count_params
from ddm.stages.runner import skip
from ddm.train.export import save_weights
from ddm.train.modules import RouterModule
from ddm.train.records import FailureRecord, clear_failure
from ddm.train.signals import PreemptionGuard
from ddm.train.trainer import (JobState, build_logger, build_trainer, fit_job, forward_flops, hardware,
                               last_checkpoint, per_device_batch)

log = logging.getLogger("ddm")


def load_partitions(rd: RunDir) -> tuple[dict, list[dict]]:
    """The partition index and every cluster's manifest, checked to come from one clustering."""
    index_path = rd.partitions / "manifest.json"
    if not index_path.exists():
        raise FileNotFoundError(f"no partitions at {rd.partitions}: run `ddm partition` first")
    index = read_json(index_path)
    manifests = [load_manifest(rd.partition(k)) for k in range(int(index["num_clusters"]))]
    ids = {m["clustering_id"] for m in manifests} | {index["clustering_id"]}
    if len(ids) != 1:
        raise ValueError(f"the partitions under {rd.partitions} come from different clusterings {sorted(ids)}; "
                         f"rerun `ddm partition redo=true`")
    return index, manifests


def split_shards(urls: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the first shard (always a full one; the last may hold
    a remainder) is held out when there are two or more."""
    held, train = (urls[:1], urls[1:]) if len(urls) > 1 else (urls, urls)
    n = max(1, math.ceil(fraction * len(train)))
    return train[:n], held


def eval_set(manifests, held, total: int):
    """Up to ``total`` held-out samples, split between clusters in proportion to their sizes."""
    sizes = np.array([m["num_samples"] for m in manifests], dtype=float)
    quota = np.maximum(1, np.round(total * sizes / sizes.sum())).astype(int)
    xs, ys, ks = [], [], []
    for k, (urls, q) in enumerate(zip(held, quota)):
        for i, s in enumerate(iter_samples(urls)):
            if i >= q:
                break
            xs.append(to_model_space(s["image"]))
            ys.append(s["label"])
            ks.append(k)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ks)


@torch.no_grad()
def accuracy_by_t(net, path: FlowPath, x0, y, k, prior: torch.Tensor, buckets: int, seed: int,
                  batch: int = 256) -> list[dict]:
    """Accuracy, entropy and calibration gap of the router in equal buckets of t, with fixed noise.

    The held-out set need not have the clusters' proportions (a small cluster's
    held-out shard is small), so each sample is weighted by prior[k] / count[k]:
    the figures are those of the data distribution.
    """
    net.eval()
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(k, minlength=len(prior)).float()
    w = (prior / counts.clamp_min(1))[k]
    w = w / w.sum()
    prior_entropy = -(prior * prior.clamp_min(1e-12).log()).sum().item()
    rows = []
    for b in range(buckets):
        lo, hi = b / buckets, (b + 1) / buckets
        t = lo + (hi - lo) * torch.rand(len(x0), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = path.interpolate(x0, eps, t)
        probs = torch.cat([net(x_t[i:i + batch], t[i:i + batch], y[i:i + batch]).float().softmax(-1)
                           for i in range(0, len(x0), batch)])
        conf, pred = probs.max(-1)
        correct = (pred == k).float()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        acc, mean_conf = (w * correct).sum().item(), (w * conf).sum().item()
        rows.append(dict(t_lo=lo, t_hi=hi, accuracy=acc, entropy=(w * entropy).sum().item(),
                         confidence=mean_conf, calibration_gap=abs(mean_conf - acc),
                         prior_accuracy=prior.max().item(), prior_entropy=prior_entropy))
    return rows


def run(cfg) -> dict:
    """Train the router over all partitions; return its record (at once if it is already finished).

    Fault handling as for an expert: resume from the newest complete checkpoint,
    save and requeue (``router.requeue``) or exit non-zero on SIGUSR1/SIGTERM,
    ``failed.json`` when training raises.
    """
    rd = RunDir(cfg.run_dir)
    job_dir = rd.router
    if skip(rd.router_record, cfg):
        record = read_json(rd.router_record)
        _check_still_current(record, rd)
        log.info("train-router: already done (%d steps) -> %s", record["steps"], job_dir)
        return record
    if cfg.get("redo", False) and job_dir.exists():
        shutil.rmtree(job_dir)

    index, manifests = load_partitions(rd)
    with PreemptionGuard() as guard, FailureRecord(job_dir, "router") as failure:
        return _train(cfg, rd, index, manifests, guard, failure)


def _check_still_current(record: dict, rd: RunDir) -> None:
    """A finished router of an older clustering must not pass for one of the current partitions."""
    index_path = rd.partitions / "manifest.json"
    if not index_path.exists():
        return
    current = read_json(index_path).get("clustering_id")
    if record.get("clustering_id") != current:
        raise ValueError(f"{rd.router_record} was trained on clustering {record.get('clustering_id')} but "
                         f"{index_path} is clustering {current}: retrain it with `ddm train-router redo=true`")


def _train(cfg, rd: RunDir, index: dict, manifests: list[dict], guard, failure) -> dict:
    job_dir = rd.router
    K = len(manifests)
    meta = manifests[0]
    rc = cfg.router
    splits = [split_shards(shard_paths(rd.partition(k), m), float(rc.sample_fraction))
              for k, m in enumerate(manifests)]
    start = time.time()
    L.seed_everything(int(cfg.seed) + 999_983, workers=True, verbose=False)
    model = dict(num_outputs=K, size=rc.size, image_size=int(meta["image_size"]),
                 in_channels=int(meta["channels"]), num_classes=int(meta["num_classes"]))
    module = RouterModule(model=model, flow=OmegaConf.to_container(cfg.flow), lr=rc.lr,
                          weight_decay=rc.weight_decay, warmup_steps=rc.warmup_steps, total_steps=rc.steps,
                          label_dropout=rc.label_dropout)
    identity = dict(job="router", clustering_id=index["clustering_id"],
                    partition_keys_sha256=[m["keys_sha256"] for m in manifests])
    logger = build_logger(cfg.logger, job_dir, cfg.run_dir, "router")
    state = JobState(identity, started=start)
    trainer = build_trainer(cfg.island, job_dir, rc.steps, rc.ckpt_every, logger, rc.log_every,
                            rc.keep_checkpoints, guard=guard, state=state)
    failure.trainer = trainer
    batch = per_device_batch(int(rc.batch_size), trainer, "router")
    parts = [(train, float(m["num_samples"])) for (train, _), m in zip(splits, manifests)]
    loader = batch_loader(mixed_stream(parts, int(meta["channels"]), int(cfg.seed), rc.shuffle_buffer),
                          batch, int(cfg.island.num_workers))
    resume = last_checkpoint(job_dir, identity)
    if resume:
        log.info("train-router: resuming from %s", resume)
    fit_job(trainer, module, loader, resume, guard, bool(rc.get("requeue", True)), "train-router")
    if trainer.global_rank != 0:
        return {}

    x0, y, k = eval_set(manifests, [held for _, held in splits], int(rc.eval_samples))
    sizes = torch.tensor([float(m["num_samples"]) for m in manifests])
    by_t = accuracy_by_t(module.net, module.path, x0, y, k, sizes / sizes.sum(), int(rc.t_buckets),
                         int(cfg.seed))
    steps = int(trainer.global_step)
    x = torch.zeros(1, int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    flops = forward_flops(module.net, (x, torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    record = dict(num_experts=K, clustering_id=index["clustering_id"], steps=steps,
                  batch_size=int(rc.batch_size), samples_seen=steps * int(rc.batch_size),
                  final_loss=module.recent_loss, params=count_params(module.net), eval_samples=len(k),
                  # one routing call per sample and solver evaluation costs forward_flops_per_sample;
                  # training: forward + backward ~ 3x forward, per sample seen
                  forward_flops_per_sample=flops, train_flops=3 * flops * steps * int(rc.batch_size),
                  accuracy_by_t=by_t, wall_s=round(state.wall_s(), 1),
                  wall_s_this_attempt=round(time.time() - start, 1), attempts=state.attempts,
                  resumed_from=str(resume) if resume else None,
                  resumed_from_step=state.resumed_step, hardware=hardware(),
                  config=OmegaConf.to_container(cfg, resolve=True))
    save_weights(rd.router_weights, "router", module.net, module.path.config(), num_experts=K,
                 clustering_id=index["clustering_id"], steps=steps)
    write_json(rd.router_record, record)
    clear_failure(job_dir)
    acc = ", ".join(f"{r['accuracy']:.2f}" for r in by_t)
    log.info("train-router: %d steps, K=%d, accuracy by t [%s] -> %s", steps, K, acc, job_dir)
    return record
