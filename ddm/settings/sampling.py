"""Settings of sampling and evaluation (``conf/sample/``, ``conf/eval/``); the values live in those files."""

from __future__ import annotations

import dataclasses

from ddm.settings.values import Group

frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@frozen
class Sample(Group):
    model: str
    # defaults for the Sample(...) made in code before these options existed (conf/sample/default.yaml sets them)
    router: str = "trained"
    route_every: int = 1
    route_tau: float | str | None = None
    strategy: str
    top_k: int
    threshold: float
    top_p: float
    cfg_routing: str
    experts: list[int] | str | None
    temperature: float
    solver: str
    steps: int
    cfg_scale: float
    cfg_interval: list[float] | None
    prompts: list[str] | None
    prompts_file: str | None
    label_order: str
    per_class: int
    grid_rows: int | None
    num_samples: int
    batch_size: int
    seed: int
    device: str
    precision: str
    offload: bool
    offload_budget_gb: float | None
    parts: int
    part: int | None


@frozen
class Heldout(Group):
    mode: str
    split: str
    data: dict
    fraction: float
    limit: int | None


@frozen
class FeatureNet(Group):
    steps: int
    batch_size: int
    lr: float
    width: int
    seed: int
    max_train_samples: int | None
    cache_dir: str


@frozen
class FmLoss(Group):
    t_grid: list[float]
    num_samples: int
    strategies: list[str]
    per_expert: bool


@frozen
class RouterDiagnostics(Group):
    t_buckets: int
    num_samples: int
    ece_bins: int


@frozen
class Flops(Group):
    measure_images: int


@frozen
class Eval(Group):
    num_samples: int
    strategies: list[str] | None
    batch_size: int
    seed: int
    per_class_min: int
    device: str
    heldout: Heldout
    feature_net: FeatureNet
    prdc_k: int
    inception_weights: str | None
    inception_batch_size: int
    inception_score: bool | str
    sfid: bool | str
    reference: str | None
    reference_cache: str
    dinov2_weights: str | None
    dinov2_model: str
    fm_loss: FmLoss
    router: RouterDiagnostics
    flops: Flops
