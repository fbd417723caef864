"""One Lightning training job, from its seed to its record: the body an expert and the router share.

A stage reads its inputs, describes its job (``Job``) and says what its record
adds; ``run_job`` does the rest, the same way for every job:

1. seed Python, NumPy, torch and the loader workers, then build the module
   (its initial weights follow the seed);
2. build the logger and the trainer, split the global batch over the island's
   devices, build the loader;
3. resume from the job's newest complete checkpoint and fit to ``steps``;
4. on every rank: gather the exported network's full weights (a collective
   when an FSDP island sharded them);
5. on global rank 0 only: build the record, export the weights, write
   ``record.json`` (last: it marks the job done) and remove an earlier
   attempt's ``failed.json``.

All of it runs holding the job folder's lock (``ddm.launch.lock``: a second job
on the same folder refuses), under a ``PreemptionGuard`` (SIGUSR1/SIGTERM save and stop, see
``ddm.train.signals``) and a ``FailureRecord`` (an exception writes
``failed.json``, see ``ddm.train.records``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from ddm.devices import module_device
from ddm.eval.flops import count_flops
from ddm.io import sha256_file, write_json
from ddm.launch.lock import job_lock
from ddm.models.conditioning import CLIP_CONTEXT, example_condition
from ddm.models.dit import count_params
from ddm.settings import Island, Logger, Training
from ddm.train.checkpoint_io import inspect_checkpoint
from ddm.train.export import save_weights
from ddm.train.fsdp import full_copy
from ddm.train.records import FailureRecord, clear_failure
from ddm.train.signals import PreemptionGuard
from ddm.train.streams import RankStreams
from ddm.train.trainer import (
    JobState,
    build_logger,
    build_trainer,
    fit_job,
    hardware,
    last_checkpoint,
    per_device_batch,
)

log = logging.getLogger("ddm")


@dataclass(frozen=True)
class Schedule:
    """How long a job trains, on what batch, and how often it saves and logs."""

    kind: str  # "expert" or "router": its config section, and the kind of weights it exports
    steps: int
    batch_size: int  # global: over every device and gradient-accumulation step
    ckpt_every: int
    log_every: int
    keep_checkpoints: int
    requeue: bool = True  # requeue the SLURM job after SIGUSR1 (see ddm.train.signals)
    grad_clip: float | None = None  # clip the global gradient norm to this before each optimizer step
    section: str | None = None  # the config section errors name, when it is not ``kind`` (distill exports an expert)
    # optimizer steps between the ranks' agreements on a signal (the NaN check's interval): each is a collective
    decide_every: int = 10

    @classmethod
    def from_config(cls, kind: str, section: Training) -> Schedule:
        """From the config section ``kind`` (``cfg.expert`` or ``cfg.router``), which holds these keys."""
        return cls(
            kind,
            int(section.steps),
            int(section.batch_size),
            int(section.ckpt_every),
            int(section.log_every),
            int(section.keep_checkpoints),
            bool(section.requeue),
            None if section.grad_clip is None else float(section.grad_clip),
            decide_every=int(section.nan_check_every),
        )


@dataclass
class Job:
    """One training job: what it trains on, how long, and where its files go."""

    name: str  # "expert-03" or "router": failed.json, the logger's run name
    title: str  # "train-expert 3" or "train-router": how log lines name the job
    folder: Path  # checkpoints/, logs/, failed.json
    identity: dict  # stored in every checkpoint: a resume refuses a checkpoint of other data
    seed: int
    build_module: Callable[[], L.LightningModule]  # called after seeding
    # (per-device batch size, the step training starts or resumes at, global rank) -> training batches
    build_loader: Callable[[int, int, int], Iterable]
    schedule: Schedule
    island: Island  # devices, strategy, precision, threads
    logger: Logger  # csv, tensorboard or wandb
    run_dir: Path
    weights: Path  # where the finished network goes (expert.pt, router.pt)
    record: Path  # record.json
    export_meta: dict  # stored in the weights file beside the network (and the steps trained)
    config: dict  # the run's resolved config, kept in the record
    callbacks: tuple = ()  # further Lightning callbacks of this job (e.g. a Preview)


@dataclass
class Trained:
    """A job whose fit reached its steps, on global rank 0: what its stage needs to finish the record."""

    job: Job
    module: L.LightningModule
    trainer: L.Trainer
    state: JobState
    resume: Path | None  # the checkpoint this attempt resumed from
    per_device_batch: int
    started: float  # time.time() when this attempt started
    export_net: torch.nn.Module  # the module's export_net with its full weights, unsharded (what is saved)

    @property
    def steps(self) -> int:
        return int(self.trainer.global_step)

    def parallelism(self) -> dict:
        """How the island split the job: devices, strategy, batch per device, accumulation."""
        t = self.trainer
        return dict(
            world_size=t.world_size,
            strategy=type(t.strategy).__name__,
            per_device_batch=self.per_device_batch,
            accumulate_grad_batches=t.accumulate_grad_batches,
        )

    def common_record(self, parallelism: bool = False) -> dict:
        """The fields of every training record, measured now; ``parallelism`` adds ``parallelism()`` to hardware."""
        net, batch, steps = self.export_net, self.job.schedule.batch_size, self.steps
        # text runs: FLOPs at the tower's full context, an upper bound (batches cut padding after the longest caption)
        encoder = getattr(self.module, "_text_encoder", None)
        flops = count_flops(net, *example_inputs(net, getattr(encoder, "context_length", CLIP_CONTEXT)))
        return dict(
            steps=steps,
            batch_size=batch,
            samples_seen=steps * batch,
            final_loss=self.module.recent_loss,
            params=count_params(net),
            # one call of the network per sample (per solver evaluation when sampling)
            forward_flops_per_sample=flops,
            # training FLOPs: forward + backward ~ 3x forward, per sample seen
            train_flops=3 * flops * steps * batch,
            # over every attempt, each counted up to the checkpoint it left (see JobState)
            wall_s=round(self.state.wall_s(), 1),
            wall_s_this_attempt=round(time.time() - self.started, 1),
            attempts=self.state.attempts,
            resumed_from=str(self.resume) if self.resume else None,
            resumed_from_step=self.state.resumed_step,
            hardware=dict(hardware(), **(self.parallelism() if parallelism else {})),
            config=self.job.config,
        )


def example_inputs(net: torch.nn.Module, text_tokens: int = CLIP_CONTEXT) -> tuple:
    """One sample's ``(x, t, y)`` for a DiT-trunk network: what its FLOPs are counted on."""
    trunk, device = net.trunk, module_device(net)
    x = torch.zeros(1, trunk.in_channels, trunk.image_size, trunk.image_size, device=device)
    return x, torch.zeros(1, device=device), example_condition(net, 1, device, text_tokens)


def run_job(job: Job, finish: Callable[[Trained], dict]) -> dict:
    """Train ``job`` to its steps and return its record, or ``{}`` on a rank other than global rank 0.

    ``finish(trained)`` builds the record, usually from
    ``trained.common_record()`` and the stage's own fields; it runs on rank 0
    only, after the fit. The module's ``export_net`` (full weights) is then saved to
    ``job.weights`` and the record to ``job.record``. A signal that stopped the
    fit raises ``Preempted`` (see ``ddm.train.trainer.fit_job``).
    """
    # The lock comes first: a job refused because another one holds the folder writes nothing there.
    with job_lock(job.folder, job.title), PreemptionGuard() as guard, FailureRecord(job.folder, job.name) as failure:
        trained = _fit(job, guard, failure)
        if trained is None:
            return {}
        record = finish(trained)
        net = trained.export_net
        save_weights(
            job.weights, job.schedule.kind, net, trained.module.path.config(), **job.export_meta, steps=trained.steps
        )
        # expert.pt travels: its checksum in record.json lets a sampler detect a damaged copy
        record["weights_sha256"] = sha256_file(job.weights)
        write_json(job.record, record)
        clear_failure(job.folder)
        return record


def _fit(job: Job, guard: PreemptionGuard, failure: FailureRecord) -> Trained | None:
    started = time.time()
    L.seed_everything(job.seed, workers=True, verbose=False)
    module = job.build_module()
    s = job.schedule
    logger = build_logger(job.logger, job.folder, job.run_dir, job.name)
    state = JobState(job.identity, started=started)
    trainer = build_trainer(
        job.island,
        job.folder,
        s.steps,
        s.ckpt_every,
        logger,
        s.log_every,
        s.keep_checkpoints,
        guard=guard,
        state=state,
        name=job.title,
        callbacks=[RankStreams(job.seed), *job.callbacks],
        grad_clip=s.grad_clip,
        decide_every=s.decide_every,
    )
    failure.trainer = trainer
    batch = per_device_batch(s.batch_size, trainer, s.section or s.kind)
    resume = last_checkpoint(job.folder, job.identity)
    start_step = int(inspect_checkpoint(resume)[0]["global_step"]) if resume else 0
    # the trainer knows its rank already; the process group (which loader workers may not see) comes in fit
    loader = job.build_loader(batch, start_step, trainer.global_rank)
    if resume:
        log.info("%s: resuming from %s", job.title, resume)
    fit_job(trainer, module, loader, resume, guard, s.requeue, job.title)
    export = full_copy(module.export_net)  # every rank: under FSDP this gathers the shards
    if trainer.global_rank != 0:
        return None
    return Trained(job, module, trainer, state, resume, batch, started, export)
