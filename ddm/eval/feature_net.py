"""A small CNN classifier trained on the dataset's training split: a feature space that needs no download.

Inception weights cannot be fetched on machines without internet, and
Inception features are a poor fit for 8x8 or 28x28 grayscale images anyway.
Instead ``ddm`` trains a small classifier on the run's own training images
(seeded, so the same data and settings give the same network) and measures
distances in its penultimate layer: globally average-pooled conv features, as
Inception's pool3 features are. Adaptive pooling makes it work for any image
size and channel count.

A trained net is cached as ``<cache_dir>/<checksum>.pt``. The checksum covers
everything that determines the weights: the training keys, images and labels,
the architecture, the seed and the optimiser settings. Changed data gives a new
checksum and so a new net; the same data reuses the file. The feature space is
named ``classifier:<checksum[:12]>`` in every report, so numbers from different
nets are never put side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddm.devices import to_device
from ddm.errors import BadInput
from ddm.images import model_space_on
from ddm.io import atomic_path, sha256_strings
from ddm.seeds import generator

log = logging.getLogger("ddm")

# Bumped when the architecture or training loop changes, so old cache files are not reused.
VERSION = 1
# The feature net's batch order is drawn from its seed + this; its initialisation from the seed itself.
BATCH_ORDER_OFFSET = 1


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


class FeatureNet(nn.Module):
    """Four 3x3 conv layers (two of them strided), global average pooling, a linear head.

    ``features(x)`` is the pooled ``4 * width`` vector the head sees.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = int(width)
        self.arch = dict(in_channels=int(in_channels), num_classes=int(num_classes), width=w)

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(_groups(cout), cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, w, 1),
            *block(w, w, 1),
            *block(w, 2 * w, 2),
            *block(2 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class TrainedFeatureNet:
    """A trained (or cached) feature net and where it came from."""

    net: FeatureNet
    checksum: str
    path: Path
    cached: bool  # True: loaded from the cache, not trained now
    info: dict = field(default_factory=dict)

    @property
    def space(self) -> str:
        """The name every report gives this feature space."""
        return f"classifier:{self.checksum[:12]}"


def data_checksum(images: np.ndarray, labels: np.ndarray, keys=None) -> str:
    """sha256 of the training keys (when given), image bytes, shape and labels."""
    h = hashlib.sha256()
    if keys is not None:
        h.update(sha256_strings(keys).encode())
    images = np.ascontiguousarray(images, dtype=np.uint8)
    h.update(str(images.shape).encode())
    h.update(images.tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_checksum(data_sha: str, settings: dict) -> str:
    """The cache key: the data checksum plus every setting that changes the trained weights."""
    blob = json.dumps(dict(data=data_sha, version=VERSION, **settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_feature_net(
    data,
    num_classes: int,
    *,
    cache_dir,
    data_sha: str | None = None,
    channels: int | None = None,
    keys=None,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    width: int = 32,
    seed: int = 0,
    device="cpu",
) -> TrainedFeatureNet:
    """Train the classifier on uint8 images with labels in ``[0, num_classes)``, or load it from the cache.

    Args:
        data: ``(images, labels)`` arrays, or a function returning them. A function
            is called only when the cache has no net for the checksum, so a cache
            hit need not read the dataset; it needs ``data_sha`` and ``channels``.
        data_sha: a checksum that identifies the training data (e.g. from its
            manifest); default: the sha256 of ``keys``, the images and the labels.
        cache_dir: folder of the cached nets, ``<checksum[:16]>.pt``.

    Training is seeded: initialisation and batch order come from ``seed`` alone.
    """
    arrays = None if callable(data) else _check_data(*data, num_classes)
    if arrays is None and (data_sha is None or channels is None):
        raise BadInput("train_feature_net: a data function needs data_sha and channels")
    if channels is None:
        channels = 1 if arrays[0].ndim == 3 else arrays[0].shape[-1]
    settings = dict(
        arch=dict(in_channels=int(channels), num_classes=int(num_classes), width=int(width)),
        steps=int(steps),
        batch_size=int(batch_size),
        lr=float(lr),
        seed=int(seed),
    )
    data_sha = data_sha or data_checksum(arrays[0], arrays[1], keys)
    checksum = cache_checksum(data_sha, settings)
    path = Path(cache_dir) / f"{checksum[:16]}.pt"

    cached = load_cached(path, checksum, device)
    if cached is not None:
        return cached
    images, labels = arrays if arrays is not None else _check_data(*data(), num_classes)
    net, info = _train(images, labels, settings, device)
    info.update(data_sha256=data_sha, num_train=len(images))
    payload = dict(
        checksum=checksum,
        arch=settings["arch"],
        info=info,
        state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
    )
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return TrainedFeatureNet(net.eval(), checksum, path, False, info)


def load_cached(path: Path, checksum: str, device="cpu") -> TrainedFeatureNet | None:
    """The cached net at ``path`` when it exists and was trained for ``checksum``, else None."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is a cache miss, not an error
        log.info("feature net: cannot read %s (%s); retraining", path, type(e).__name__)
        return None
    if not isinstance(payload, dict) or payload.get("checksum") != checksum:
        log.info("feature net: %s holds another checksum; retraining", path)
        return None
    net = FeatureNet(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    return TrainedFeatureNet(net.eval().to(device), checksum, path, True, payload["info"])


def _check_data(images, labels, num_classes: int):
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels) or len(images) == 0:
        raise BadInput(f"feature net: {len(images)} images and {len(labels)} labels; need equal, non-zero counts")
    if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise BadInput(
            f"feature net: labels must lie in [0, {num_classes}) with at least 2 classes; got "
            f"{labels.min()}..{labels.max()}"
        )
    return images, labels


def _train(images, labels, settings: dict, device) -> tuple[FeatureNet, dict]:
    seed = settings["seed"]
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(seed)
        net = FeatureNet(**settings["arch"]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=1e-4)
    steps, batch = settings["steps"], min(settings["batch_size"], len(images))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=max(steps, 1), pct_start=0.1)
    # uint8 images stay on the host and each batch crosses as uint8, scaled on the device: no float copy of
    # the training set, and the same values and layout as batch_to_model_space(images)[idx]
    y_all = torch.from_numpy(labels)
    g = generator(seed + BATCH_ORDER_OFFSET)  # batch order, independent of the init's draws
    net.train()
    recent = []  # the last 20 losses, left on the device: read once, after the loop
    perm, pos = torch.randperm(len(images), generator=g), 0
    for _ in range(steps):
        if pos + batch > len(perm):  # epochs without replacement: every image is seen equally often
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        logits = net(model_space_on(images[idx.numpy()], device))
        loss = F.cross_entropy(logits, to_device(y_all[idx], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.detach()])[-20:]
    recent = [loss.item() for loss in recent]
    net.eval()
    train_acc = accuracy(net, images[:5000], labels[:5000])  # a bounded sample: enough to spot underfitting
    return net, dict(
        steps=steps,
        final_loss=float(np.mean(recent)) if recent else None,
        train_accuracy=train_acc,
        feature_dim=net.feature_dim,
        torch=str(torch.__version__),
    )


@torch.no_grad()
def batched_on_device(fn, images: np.ndarray, batch_size: int, device) -> torch.Tensor:
    """``fn`` of uint8 images in batches of ``batch_size``, the outputs concatenated where they were computed.

    One upload per batch (its uint8 pixels) and no read of a result on the host:
    the caller brings the whole output back at once.
    """
    return torch.cat(
        [fn(model_space_on(images[i : i + batch_size], device)).float() for i in range(0, len(images), batch_size)]
    )


def features(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features [N, 4 * width] of uint8 images, as float64 for the statistics.

    Computed on the net's device; the float32 features come back to the host once, at the end.
    """
    device = next(net.parameters()).device
    return batched_on_device(net.features, np.asarray(images), batch_size, device).cpu().double().numpy()


def predict(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The predicted class of each uint8 image (argmax on the device: only the indices come back)."""
    device = next(net.parameters()).device
    return batched_on_device(net, np.asarray(images), batch_size, device).argmax(1).cpu().numpy()


def features_and_classes(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(features(net, images), predict(net, images))`` in one pass of the net: the head reads the features."""
    device = next(net.parameters()).device

    def both(x: torch.Tensor) -> torch.Tensor:
        f = net.features(x)
        return torch.cat([f, net.head(f).argmax(1, keepdim=True).to(f.dtype)], 1)

    out = batched_on_device(both, np.asarray(images), batch_size, device).cpu()
    return out[:, :-1].double().numpy(), out[:, -1].long().numpy()


def accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float | None:
    """Fraction of labelled images (label >= 0) classified correctly; None when none is labelled."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return None
    return float((predict(net, np.asarray(images)[keep], batch_size) == labels[keep]).mean())


def default_cache_dir() -> Path:
    """``$DDM_CACHE/feature_net`` or ``~/.cache/ddm/feature_net``: shared by every run on the machine."""
    root = os.environ.get("DDM_CACHE") or Path.home() / ".cache" / "ddm"
    return Path(root) / "feature_net"
