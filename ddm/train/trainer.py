"""Building a Lightning Trainer for one job on one island, its logger and its checkpoints.

A job must survive being stopped at any moment: checkpoints are written
atomically (``AtomicCheckpointIO``), a resumed job starts from the newest
complete checkpoint (``last_checkpoint``), a SIGUSR1/SIGTERM saves and stops
at the next step (``JobCheckpoint`` with a ``PreemptionGuard``), and each
checkpoint carries the job's identity and the wall time spent so far
(``JobState``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ddm.errors import BadInput
from ddm.models.dit import DiTTrunk
from ddm.settings import Island, Logger
from ddm.train.checkpoint_io import AtomicCheckpointIO, latest_complete_checkpoint
from ddm.train.fsdp import island_strategy
from ddm.train.job_checkpoint import JobCheckpoint
from ddm.train.progress import interactive, progress_callbacks
from ddm.train.quiet import quiet_lightning
from ddm.train.signals import PreemptionGuard, stop_after_preemption

log = logging.getLogger("ddm")


def stable_run_id(run_dir: str | Path, job: str) -> str:
    """The same id for the same (run, job) every time: a requeued job continues its wandb run."""
    return hashlib.sha1(f"{Path(run_dir).resolve()}::{job}".encode()).hexdigest()[:16]


def _wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").exists()
        and "api.wandb.ai" in (Path.home() / ".netrc").read_text()
    )
    return "online" if has_key else "offline"


def build_logger(logger_cfg: Logger, job_dir: Path, run_dir: str | Path, job: str):
    """csv (default), tensorboard or wandb; all write under the job's own folder."""
    kind = logger_cfg.kind
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        # One folder per attempt (logs/version_0, version_1, ...): a resumed job would otherwise
        # delete the metrics.csv of the attempts before it.
        return CSVLogger(job_dir, name="logs")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(job_dir, name="logs", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = _wandb_mode(logger_cfg.mode)
        if mode == "offline":
            log.info("wandb: no API key found, logging offline under %s/wandb", job_dir)
        run_name = Path(run_dir).name
        return WandbLogger(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            name=f"{run_name}/{job}",
            group=run_name,
            id=stable_run_id(run_dir, job),
            resume="allow",
            save_dir=str(job_dir),
            mode=mode,
        )
    raise BadInput(f"logger.kind={kind!r} is not one of csv, tensorboard, wandb: pick one with logger=<kind>")


class JobState(Callback):
    """What every checkpoint of a job carries under ``checkpoint["ddm"]``.

    ``identity`` (clustering id, partition checksum) lets a resume refuse a
    checkpoint of other data; ``wall_s`` and ``attempts`` add up over resumes,
    so a record's wall time covers every attempt (up to the checkpoint each
    one left).
    """

    def __init__(self, identity: dict, started: float | None = None):
        self.identity = dict(identity)
        self.started = time.time() if started is None else started
        self.prior_wall_s = 0.0
        self.prior_attempts = 0
        self.resumed_step: int | None = None  # global step of the checkpoint this attempt resumed from

    @property
    def attempts(self) -> int:
        return self.prior_attempts + 1

    def wall_s(self) -> float:
        """Seconds spent by this job so far, over all its attempts."""
        return self.prior_wall_s + (time.time() - self.started)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ddm"] = dict(self.identity, wall_s=self.wall_s(), attempts=self.attempts)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        stored = checkpoint.get("ddm") or {}
        self.prior_wall_s = float(stored.get("wall_s", 0.0))
        self.prior_attempts = int(stored.get("attempts", 0))
        self.resumed_step = int(checkpoint.get("global_step", 0))


class ActivationCheckpointing(Callback):
    """``island.activation_checkpointing``: every DiT trunk of the module recomputes its blocks' activations
    in the backward pass instead of keeping them (under any strategy; under FSDP each block is also a unit)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        for module in pl_module.modules():
            if isinstance(module, DiTTrunk):
                module.checkpoint_blocks = True


def _plugins() -> list:
    plugins: list = [AtomicCheckpointIO()]
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Lightning would otherwise handle SIGUSR1 itself (hpc_ckpt_*.ckpt + its own requeue);
        # ddm's PreemptionGuard and JobCheckpoint do that, once.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_trainer(
    island: Island,
    job_dir: Path,
    max_steps: int,
    ckpt_every: int,
    logger,
    log_every: int = 10,
    keep_checkpoints: int = 2,
    callbacks=(),
    guard: PreemptionGuard | None = None,
    state: JobState | None = None,
    name: str = "train",
    grad_clip: float | None = None,
    decide_every: int = 10,
) -> L.Trainer:
    """A Trainer for one job: atomic checkpoints every ``ckpt_every`` steps plus ``last.ckpt``.

    With a ``guard``, a SIGUSR1/SIGTERM saves ``last.ckpt`` within ``decide_every``
    steps (at the next step on one device) and stops the fit (the caller then
    requeues or exits: see ``ddm.train.signals``).
    With a ``state``, each checkpoint records the job's identity and wall time.
    Progress shows as a bar on a terminal, else as a log line every ``log_every``
    steps that starts with ``name`` (see ``ddm.train.progress``).
    """
    quiet_lightning()
    if island.threads:
        torch.set_num_threads(int(island.threads))
    if torch.cuda.is_available():
        # what runs outside bf16 autocast (fp32 islands, the optimizer's own math) may use TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    checkpoint = JobCheckpoint(
        dirpath=job_dir / "checkpoints",
        filename="step-{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=ckpt_every,
        save_last=True,
        save_top_k=keep_checkpoints,
        monitor="step",
        mode="max",
        guard=guard,
        decide_every=decide_every,
    )
    extra = [state] if state is not None else []
    if island.activation_checkpointing:
        extra.append(ActivationCheckpointing())
    return L.Trainer(
        accelerator=island.accelerator,
        devices=island.devices,
        num_nodes=island.num_nodes,
        strategy=island_strategy(island),
        precision=island.precision,
        accumulate_grad_batches=island.accumulate_grad_batches,
        plugins=_plugins(),
        max_steps=max_steps,
        logger=logger,
        callbacks=[checkpoint, *progress_callbacks(name, log_every), *extra, *callbacks],
        enable_progress_bar=interactive(),
        log_every_n_steps=log_every,
        # by norm: the same rule under DDP and FSDP, where the norm is that of all gradient shards together
        gradient_clip_val=grad_clip,
        gradient_clip_algorithm="norm",
        default_root_dir=job_dir,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def fit_job(
    trainer: L.Trainer,
    module: L.LightningModule,
    loader,
    resume: Path | None,
    guard: PreemptionGuard,
    requeue: bool,
    what: str,
) -> None:
    """``trainer.fit`` from ``resume``; when a signal stopped it early, raise ``Preempted``.

    ``Preempted`` (a ``SystemExit``) carries exit status 0 when the SLURM job was
    requeued, else 128 + the signal number; ``last.ckpt`` is saved either way.
    """
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    except SystemExit:
        # Lightning raises its SIGTERMException when a SIGTERM reached its own handler in the
        # instant before the guard took the signal back; the guard saw that signal too.
        if not guard.requested:
            raise
    if guard.requested and trainer.global_step < trainer.max_steps:
        raise stop_after_preemption(guard, what, int(trainer.global_step), requeue, trainer.is_global_zero)


def per_device_batch(global_batch: int, trainer: L.Trainer, what: str) -> int:
    """Split a job's global batch over its devices and accumulation steps, exactly."""
    accumulate = trainer.accumulate_grad_batches
    shards = trainer.world_size * accumulate
    if global_batch % shards:
        raise BadInput(
            f"{what}.batch_size={global_batch} is not divisible by devices x nodes x "
            f"accumulate_grad_batches = {shards}; choose a batch size that is, so every "
            f"island reproduces the same global batch"
        )
    return global_batch // shards


def last_checkpoint(job_dir: Path, identity: dict | None = None) -> Path | None:
    """The newest complete checkpoint of a job (``last.ckpt`` or a ``step-*.ckpt``), or None.

    Broken checkpoints are skipped by name in the log; one written for other
    data (``identity`` differs) is an error. See ``latest_complete_checkpoint``.
    """
    return latest_complete_checkpoint(job_dir / "checkpoints", identity)


def hardware() -> dict:
    info = dict(
        host=platform.node(),  # which node (and so which island) trained it: `ddm status` shows it
        torch=torch.__version__,
        cuda=torch.cuda.is_available(),
        cpu_threads=torch.get_num_threads(),
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
