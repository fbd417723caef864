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
class Store(Group):
    cache: str
    checkpoint_every_s: float
    lease_s: float
    transfers: int
    origin: str | None


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
    image_format: Literal["png", "jpeg"]  # how prepare stores images
    quality: int  # JPEG quality
    workers: int | None  # processes writing shards, in prepare and partition (None: every available core)
    parts: int  # jobs that write data/ between them
    part: int | None  # which of them this job is (None: the merge of them all)


@frozen
class Embed(Group):
    encoder: str
    batch_size: int
    workers: int | None  # loader processes decoding the shards; None: from the cores the job may use
    dtype: Literal["float32", "float16"] | None  # of the stored embeddings; None: float32
    parts: int  # jobs that embed the data between them
    part: int | None  # which of them this job is (None: the merge of them all)
    # pixels
    size: int | None
    dim: int | None
    seed: int | None
    # open_clip, torchvision, dinov2
    model: str | None
    pretrained: str | None
    weights: str | None
    image_size: int | None
    device: str | None
    # dinov2
    pool: Literal["cls", "mean"] | None  # the CLS token, or the mean of the patch tokens


@frozen
class Cluster(Group):
    method: str
    k: int
    fine_k: int | None
    niter: int | None
    seed: int
    spherical: bool | None
    train_sample: int | None  # k-means trains on at most this many rows, drawn with the seed; None: all
    min_shards_per_partition: int
    partition_shard_size: int
    partition_parts: int  # jobs that write partitions/, each a share of the clusters (1: this job alone)
    partition_part: int | None  # the part this job writes; None: all of them, or the merge of partition_parts jobs


@frozen
class Vae(Group):
    kind: str
    pretrained: str | None
    allow_download: bool | None
    flip: bool | None
    batch_size: int | None
    device: str | None
    precision: str | None
    workers: int | None  # processes decoding the partition's images for `ddm encode`; None: every core
    clusters: int | list[int] | None  # which clusters `ddm encode` encodes; None: all


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
