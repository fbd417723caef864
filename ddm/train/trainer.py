"""Building a Lightning Trainer for one job on one island, its logger and its checkpoints."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

log = logging.getLogger("ddm")


def stable_run_id(run_dir: str | Path, job: str) -> str:
    """The same id for the same (run, job) every time: a requeued job continues its wandb run."""
    return hashlib.sha1(f"{Path(run_dir).resolve()}::{job}".encode()).hexdigest()[:16]


def _wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() \
        and "api.wandb.ai" in (Path.home() / ".netrc").read_text()
    return "online" if has_key else "offline"


def build_logger(logger_cfg, job_dir: Path, run_dir: str | Path, job: str):
    """csv (default), tensorboard or wandb; all write under the job's own folder."""
    kind = logger_cfg.get("kind", "csv")
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(job_dir, name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(job_dir, name="logs", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        mode = _wandb_mode(logger_cfg.get("mode"))
        if mode == "offline":
            log.info("wandb: no API key found, logging offline under %s/wandb", job_dir)
        run_name = Path(run_dir).name
        return WandbLogger(project=logger_cfg.get("project", "ddm"), entity=logger_cfg.get("entity"),
                           name=f"{run_name}/{job}", group=run_name, id=stable_run_id(run_dir, job),
                           resume="allow", save_dir=str(job_dir), mode=mode)
    raise ValueError(f"logger.kind={kind!r} is not one of csv, tensorboard, wandb")


def build_trainer(island, job_dir: Path, max_steps: int, ckpt_every: int, logger, log_every: int = 10,
                  keep_checkpoints: int = 2, callbacks=()) -> L.Trainer:
    """A Trainer for one job: checkpoints every ``ckpt_every`` steps plus ``last.ckpt``."""
    if island.get("threads"):
        torch.set_num_threads(int(island.threads))
    checkpoint = ModelCheckpoint(
        dirpath=job_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=ckpt_every, save_last=True, save_top_k=keep_checkpoints, monitor="step", mode="max")
    return L.Trainer(
        accelerator=island.accelerator, devices=island.devices, num_nodes=island.num_nodes,
        strategy=island.strategy, precision=island.precision,
        accumulate_grad_batches=island.get("accumulate_grad_batches", 1),
        max_steps=max_steps, logger=logger, callbacks=[checkpoint, TQDMProgressBar(refresh_rate=10), *callbacks],
        log_every_n_steps=log_every, default_root_dir=job_dir, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )


def per_device_batch(global_batch: int, trainer: L.Trainer, what: str) -> int:
    """Split a job's global batch over its devices and accumulation steps, exactly."""
    accumulate = trainer.accumulate_grad_batches
    shards = trainer.world_size * accumulate
    if global_batch % shards:
        raise ValueError(f"{what}.batch_size={global_batch} is not divisible by devices x nodes x "
                         f"accumulate_grad_batches = {shards}; choose a batch size that is, so every "
                         f"island reproduces the same global batch")
    return global_batch // shards


def last_checkpoint(job_dir: Path) -> Path | None:
    path = job_dir / "checkpoints" / "last.ckpt"
    return path if path.exists() else None


def hardware() -> dict:
    info = dict(torch=torch.__version__, cuda=torch.cuda.is_available(), cpu_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def forward_flops(model: torch.nn.Module, example_args) -> int:
    """FLOPs of one forward pass, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_args)
    return int(counter.get_total_flops())
