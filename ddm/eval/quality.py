"""Sample quality in one feature space: FD, precision/recall, class accuracy and per-class figures.

Everything is measured against the same held-out real images, so the numbers
of different strategies (and of the training-image reference) compare like
with like. The feature space is whatever ``extract`` maps images to: the
classifier of ``ddm.eval.feature_net``, Inception, or any other function.

``extract`` returns the features, or a dict of them: ``features`` (FD, precision,
recall), and where the network gives them ``spatial`` (ADM's sFID features: the
sFID against the held-out images' and, with spatial reference statistics, against
those) and ``probs`` (class probabilities: the Inception Score of each set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ddm.eval.fid import frechet_distance_features
from ddm.eval.inception_score import SPLITS, inception_score
from ddm.eval.prdc import precision_recall

Extract = Callable[[np.ndarray], np.ndarray]  # uint8 images [N, ...] -> features [N, D]


def sample_quality(
    extract: Extract,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    generated: Mapping[str, tuple[np.ndarray, np.ndarray]],
    reference_images: np.ndarray,
    *,
    k: int = 5,
    per_class_min: int = 10,
    classify: Callable[[np.ndarray], np.ndarray] | None = None,
    reference_stats=None,
    is_splits: int = SPLITS,
) -> dict:
    """The quality of each set of generated images, compared with ``real_images``.

    Args:
        extract: maps uint8 images to feature vectors.
        real_images, real_labels: the held-out images and their labels (-1: unlabelled).
        generated: ``{strategy: (images, labels)}``; labels are -1 for unconditional samples.
        reference_images: training images, as many as ``real_images``: what a model
            that reproduced its training data would score (the floor for this number of images).
        k: neighbours of the k-NN manifolds of precision and recall.
        per_class_min: per-class figures only for classes with at least this many
            real and generated images.
        classify: maps images to predicted labels; gives ``classifier_accuracy``.
        reference_stats: a ``ddm.eval.reference.ReferenceStats`` of this feature space; gives
            ``fd_reference``, the FD against its (mu, sigma), beside the FD against ``real_images``
            (and ``sfid_reference`` when it holds spatial statistics and ``extract`` gives ``spatial``).
        is_splits: parts of the Inception Score (when ``extract`` gives ``probs``).

    Returns the part of a feature space's entry in metrics.json that depends on
    the images::

        num_real
        reference_training_images   {num_images, fd, precision, recall, fd_reference (with reference_stats)}
        strategies  {<strategy>: {num_generated, fd, precision, recall, fd_reference (with reference_stats),
                                  sfid, sfid_reference     (when extract gives ``spatial``)
                                  inception_score {mean, std, splits, num_images}  (when it gives ``probs``)
                                  classifier_accuracy   (when classify is given and both sets have labels)
                                  per_class             (when both sets have labels):
                                      {"<class>": {num_real, num_generated, fd, precision, recall,
                                                   classifier_accuracy (with classify)}}}}

    Precision and recall are None when a set has no more than ``k`` images.
    """
    real = _outputs(extract(real_images))
    real_f, real_labels = real["features"], np.asarray(real_labels)
    ref = _outputs(extract(reference_images))
    ref_f = ref["features"]
    reference = dict(
        num_images=len(reference_images),
        fd=frechet_distance_features(ref_f, real_f),
        **_precision_recall(real_f, ref_f, k),
        **_extras(ref, real, reference_stats, is_splits),
    )
    if reference_stats is not None:
        reference["fd_reference"] = reference_stats.fd(ref_f)
    out = dict(num_real=len(real_images), reference_training_images=reference, strategies={})
    for strategy, (images, labels) in generated.items():
        labels = np.asarray(labels)
        gen = _outputs(extract(images))
        gen_f = gen["features"]
        row = dict(
            num_generated=len(gen_f), fd=frechet_distance_features(gen_f, real_f), **_precision_recall(real_f, gen_f, k)
        )
        if reference_stats is not None:
            row["fd_reference"] = reference_stats.fd(gen_f)
        row.update(_extras(gen, real, reference_stats, is_splits))
        has_labels = bool((labels >= 0).any() and (real_labels >= 0).any())
        predicted = classify(images) if classify is not None and has_labels else None
        if predicted is not None:
            row["classifier_accuracy"] = float((predicted == labels).mean())
        if has_labels:
            row["per_class"] = per_class(real_f, real_labels, gen_f, labels, k, per_class_min, predicted)
        out["strategies"][strategy] = row
    return out


def _outputs(out) -> dict:
    """``extract``'s result as a dict with at least ``features``."""
    return out if isinstance(out, dict) else dict(features=out)


def _extras(images: dict, real: dict, reference_stats, is_splits: int) -> dict:
    """sFID (against the held-out images' spatial features and the reference's) and the Inception Score, where
    the outputs hold what they need."""
    out = {}
    if "spatial" in images and "spatial" in real:
        out["sfid"] = frechet_distance_features(images["spatial"], real["spatial"])
        if reference_stats is not None and getattr(reference_stats, "mu_s", None) is not None:
            out["sfid_reference"] = reference_stats.sfd(images["spatial"])
    if "probs" in images:
        out["inception_score"] = inception_score(images["probs"], is_splits)
    return out


def per_class(
    real_f: np.ndarray,
    real_y: np.ndarray,
    gen_f: np.ndarray,
    gen_y: np.ndarray,
    k: int,
    min_count: int,
    predicted: np.ndarray | None = None,
) -> dict:
    """``{"<class>": {num_real, num_generated, fd, precision, recall}}`` for classes in both sets with enough images.

    With ``predicted`` (the classifier's label of each generated image), each class also gets
    ``classifier_accuracy``: the fraction of the images asked for as that class that were classified as it.
    """
    out = {}
    for c in sorted(set(real_y[real_y >= 0].tolist()) & set(gen_y[gen_y >= 0].tolist())):
        r, g = real_f[real_y == c], gen_f[gen_y == c]
        if min(len(r), len(g)) < max(min_count, 2):  # FD needs two points for a covariance
            continue
        out[str(c)] = dict(
            num_real=len(r), num_generated=len(g), fd=frechet_distance_features(g, r), **_precision_recall(r, g, k)
        )
        if predicted is not None:
            out[str(c)]["classifier_accuracy"] = float((np.asarray(predicted)[gen_y == c] == c).mean())
    return out


def _precision_recall(real_f: np.ndarray, gen_f: np.ndarray, k: int) -> dict:
    """Precision/recall when both sets have more than k points, else None values."""
    if min(len(real_f), len(gen_f)) <= k:
        return dict(precision=None, recall=None)
    pr = precision_recall(real_f, gen_f, k)
    return dict(precision=pr["precision"], recall=pr["recall"])
