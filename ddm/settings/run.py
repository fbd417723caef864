"""Settings of what a run is made of: its data, clustering, latent space, text, network and flow path.

Each class mirrors one config group (``conf/<group>/*.yaml``); the values and
their comments live in those files, written once. Keys only some options of a
group have (``data.urls``, ``embed.model``) are None under the others.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ddm.settings.values import Group

frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@frozen
class Paths(Group):
    runs: str


@frozen
class Data(Group):
    source: str
    root: str | None
    urls: str | list[str] | None
    split: str
    classes: list[int] | None
    limit: int | None
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str] | None
    shard_size: int
    resize: int | None
    background: list[int]  # [R, G, B] 0..255 that transparent pixels are composited over
    on_error: Literal["raise", "skip"]  # an unreadable image stops prepare, or is skipped and listed


@frozen
class Embed(Group):
    encoder: str
    batch_size: int
    # pixels
    size: int | None
    dim: int | None
    seed: int | None
    # open_clip, torchvision
    model: str | None
    pretrained: str | None
    weights: str | None
    image_size: int | None
    device: str | None


@frozen
class Cluster(Group):
    method: str
    k: int
    fine_k: int | None
    niter: int | None
    seed: int
    spherical: bool | None
    min_shards_per_partition: int
    partition_shard_size: int


@frozen
class Vae(Group):
    kind: str
    pretrained: str | None
    allow_download: bool | None
    flip: bool | None
    batch_size: int | None
    device: str | None


@frozen
class Text(Group):
    kind: str
    model: str | None
    pretrained: str | None
    caption_template: str | None
    router: bool | None
    cache: int | None
    store: bool | None


@frozen
class Model(Group):
    size: str
    image_size: int
    in_channels: int
    num_classes: int
    conv_head: int
    compile: bool


@frozen
class Flow(Group):
    schedule: str
    time_sampling: str
    logit_mean: float
    logit_std: float
    t_eps: float
