"""The feature spaces sample quality is measured in, built from a run and ``cfg.eval``.

``classifier:<checksum[:12]>``: the small CNN of ``ddm.eval.feature_net``,
trained on the run's training images (``data/`` minus a held-out slice), with
class labels when the data has them and cluster labels otherwise; cached by a
checksum of its training data and settings. ``inception:<sha[:12]>``: the FID
Inception, when ``eval.inception_weights`` names a local file, with the Inception
Score and sFID where the file gives them (``eval.inception_score``, ``eval.sfid``)
and FID against ``eval.reference`` (a statistics file, or images whose statistics
are computed and cached). ``dinov2:<sha[:12]>``: DINOv2's CLS features
(Stein et al. 2023), when ``eval.dinov2_weights`` names a local file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.artifacts import RunDir
from ddm.data.shards import load_manifest
from ddm.errors import BadInput
from ddm.eval import feature_net as fnet
from ddm.eval.heldout import load_images
from ddm.eval.run.clusters import cluster_labels
from ddm.io import read_json, sha256_strings
from ddm.settings import Eval
from ddm.settings.sampling import FeatureNet


def training_data_sha(rd: RunDir, heldout: dict, target: str, max_samples, seed: int) -> str:
    """A checksum of the feature net's training data, from manifests only (no image is read).

    ``heldout`` is the held-out manifest, ``target`` ``class`` or ``cluster``,
    ``max_samples`` and ``seed`` the subsample of ``eval.feature_net``.
    """
    data = load_manifest(rd.data)
    parts = dict(
        keys=data.get("keys_sha256"),
        shards=[s["sha256"] for s in data["shards"]],
        excluded=heldout["keys_sha256"] if heldout.get("excluded_from_training") else None,
        target=target,
        max_samples=max_samples,
        subsample_seed=seed,
    )
    if target == "cluster":
        parts["clustering_id"] = read_json(rd.cluster_report)["clustering_id"]
    return sha256_strings([json.dumps(parts, sort_keys=True)])


def training_images(
    rd: RunDir, exclude: set | None, target: str, max_samples, subsample_seed: int, run_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) the feature net trains on: ``data/`` without ``exclude``, at most ``max_samples``."""
    x, y, keys = load_images(rd.data, exclude=exclude)
    if target == "cluster":
        y, _ = cluster_labels(rd, keys, x, run_seed)
    if max_samples is not None and len(x) > max_samples:
        idx = np.sort(np.random.default_rng(subsample_seed).choice(len(x), max_samples, replace=False))
        x, y = x[idx], y[idx]
    return x, y


def train_classifier(
    rd: RunDir,
    fc: FeatureNet,
    heldout: dict,
    exclude: set | None,
    target: str,
    num_classes: int,
    channels: int,
    run_seed: int,
    device,
) -> fnet.TrainedFeatureNet:
    """The feature net for ``eval.feature_net`` settings ``fc``, from the cache when it holds one.

    The training images are read only on a cache miss: the cache key comes from the manifests.
    """
    max_samples = None if fc.max_train_samples is None else int(fc.max_train_samples)
    data_sha = training_data_sha(rd, heldout, target, max_samples, int(fc.seed))
    return fnet.train_feature_net(
        lambda: training_images(rd, exclude, target, max_samples, int(fc.seed), run_seed),
        num_classes,
        cache_dir=fc.cache_dir,
        data_sha=data_sha,
        channels=channels,
        steps=int(fc.steps),
        batch_size=int(fc.batch_size),
        lr=float(fc.lr),
        width=int(fc.width),
        seed=int(fc.seed),
        device=device,
    )


def classifier_info(
    net: fnet.TrainedFeatureNet, target: str, test_images: np.ndarray, test_labels: np.ndarray, batch_size: int
) -> dict:
    """What a classifier feature space's entry in metrics.json says about the net itself.

    ``{kind: "classifier", target (class | cluster), checksum, cache_file, cached,
    test_accuracy (on the held-out images; None without labels), test_images,
    feature_dim, train (its training summary)}``
    """
    acc = fnet.accuracy(net.net, test_images, test_labels, batch_size) if len(test_labels) else None
    return dict(
        kind="classifier",
        target=target,
        checksum=net.checksum,
        cache_file=str(net.path),
        cached=net.cached,
        test_accuracy=acc,
        test_images=int((np.asarray(test_labels) >= 0).sum()),
        feature_dim=net.net.feature_dim,
        train=net.info,
    )


def classifier_functions(net: fnet.TrainedFeatureNet, target: str, batch_size: int) -> tuple[Callable, Callable | None]:
    """``(extract, classify)`` of a classifier net; ``classify`` only when it predicts classes, not clusters."""
    classify = (lambda x: fnet.predict(net.net, x, batch_size)) if target == "class" else None
    return (lambda x: fnet.features(net.net, x, batch_size)), classify


def load_inception(ec: Eval, device=None):
    """The Inception feature extractor named by ``eval.inception_weights``, on ``device`` (None: the CPU), or
    None when it is null."""
    if ec.inception_weights is None:
        return None
    from ddm.eval.inception import load_inception as load  # torch.jit and torchvision: only when asked for

    return load(ec.inception_weights, device=device)


def load_reference_stats(ec: Eval, inception, image_size: tuple[int, int] | None = None):
    """The statistics named by ``eval.reference``, checked against the Inception's feature space and against
    ``image_size`` (the samples' height and width), or None when it is null. They only mean FID in the Inception
    space, so they need ``eval.inception_weights``.

    A folder of images or shards is read (its statistics computed on the Inception's device, in batches of
    ``eval.inception_batch_size``) only when ``eval.reference_cache`` holds no statistics of its bytes.
    """
    if ec.reference is None:
        return None
    if inception is None or not inception.kind.startswith("fid_inception"):
        what = "is null" if inception is None else f"is {inception.kind}, not the FID Inception"
        raise BadInput(
            f"eval.reference={ec.reference} holds FID Inception statistics but eval.inception_weights {what}: "
            "point eval.inception_weights at the FID Inception file"
        )
    from ddm.eval.reference import INCEPTION_DIM, load_reference

    path = Path(str(ec.reference)).expanduser()
    if path.is_dir():
        from ddm.eval.reference_images import reference_from_images

        return reference_from_images(
            path, inception, ec.reference_cache, int(ec.inception_batch_size), image_size, "the run's images"
        )
    reference = load_reference(path, inception.space, INCEPTION_DIM)
    if image_size is not None:
        reference.check_image_size(image_size, "the run's images")
    return reference


def inception_extras(ec: Eval, inception) -> dict:
    """``{spatial, probs}``: whether the Inception space also measures sFID and the Inception Score.

    ``eval.sfid`` and ``eval.inception_score`` are true (the file must give them: a clear error naming it and
    the files that do), false, or auto (when the file gives them).
    """
    if inception is None:
        return dict(spatial=False, probs=False)
    from ddm.eval.inception import IS_FILES, SFID_FILES

    def wanted(key: str, value, supported: bool, files: str) -> bool:
        if value == "auto":
            return supported
        if not isinstance(value, bool):
            raise BadInput(f"eval.{key}={value!r}: use true, false or auto")
        if value and not supported:
            raise BadInput(f"eval.inception_weights={inception.path} ({inception.kind}) cannot give it: {files}")
        return value

    return dict(
        spatial=wanted("sfid", ec.sfid, inception.has_spatial, SFID_FILES),
        probs=wanted("inception_score", ec.inception_score, inception.has_logits, IS_FILES),
    )


def load_dinov2(ec: Eval, device=None):
    """The DINOv2 feature extractor of ``eval.dinov2_weights`` (``ddm.eval.dinov2_space``), or None when null."""
    if ec.dinov2_weights is None:
        return None
    from ddm.eval.dinov2_space import load_dinov2 as load  # timm: only when asked for

    return load(ec.dinov2_weights, str(ec.dinov2_model), device=device)


def data_image_size(rd: RunDir) -> tuple[int, int]:
    """(height, width) of the run's images (``data/``'s manifest): the size its samples are compared at."""
    size = int(load_manifest(rd.data)["image_size"])
    return size, size
