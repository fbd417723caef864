"""Settings of the training jobs and where they run: expert, router, distillation, growing, island, logger.

Each class mirrors one config group (``conf/<group>/*.yaml``); the values and
their comments live in those files, written once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ddm.settings.values import Group

frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@frozen
class Training(Group):
    """What every training job has (``expert``, ``router``, ``distill``): its optimiser, schedule, checkpoints,
    loader and requeue settings."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    betas: list[float]
    warmup_steps: int
    label_dropout: float
    grad_clip: float | None
    ckpt_every: int
    keep_checkpoints: int
    log_every: int
    nan_check_every: int
    shuffle_buffer: int
    requeue: bool
    verify_wait_s: float


@frozen
class Expert(Training):
    id: int
    target: str
    init: str
    ema_decay: float
    preview_every: int
    preview_rows: int
    preview_per_row: int
    preview_steps: int
    shard_url: str | None


@frozen
class Router(Training):
    size: str
    time_sampling: str
    logit_mean: float
    logit_std: float
    sample_fraction: float
    eval_samples: int
    t_buckets: int
    preview_every: int
    preview_samples: int
    compile: bool


@frozen
class Distill(Training):
    size: str | None
    ema_decay: float
    data_weight: float
    compile: bool


@frozen
class Extend(Group):
    shards: str | None
    mode: str
    train: bool
    finetune_steps: int | None


@frozen
class Slurm(Group):
    partition: str | None
    time: str | None
    cpus_per_task: int
    mem: str | None
    gres: str | None
    account: str | None
    signal_before_s: int
    setup: list[str]
    extra: list[str]


@frozen
class Island(Group):
    accelerator: str
    devices: int | list[int] | str
    num_nodes: int
    strategy: str
    sharding: str
    activation_checkpointing: bool
    precision: str | int
    threads: int | None
    num_workers: int
    accumulate_grad_batches: int
    slurm: Slurm


@frozen
class Logger(Group):
    kind: str
    project: str | None
    entity: str | None
    mode: str | None


@frozen
class Submit(Group):
    # the training jobs, or a stage's parts
    stage: Literal["train", "prepare", "embed", "partition", "encode", "sample"]
    launcher: str
    experts: list[int] | None
    router: bool
    dry_run: bool
    python: str | None
    parallel: int | Literal["auto"]
    wait: bool


@frozen
class Pipeline(Group):
    parallel: int | Literal["auto"]
    evaluate: bool


@frozen
class Plan(Group):
    images_per_s: float | None
    mfu: float
    mfu_batch: int
    peak_tflops: float
    nvlink_gb_s: float | None
    network_gb_s: float | None
