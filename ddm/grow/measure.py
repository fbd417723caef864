"""Measuring a grown run: are samples of the added classes those classes, and which expert drew them?

``class_rates`` samples ``per_class`` images of each class through the run's
ensemble (top-1 routing, the sample stage's solver) and reports, per class, the
fraction a classifier gives that class and the share of model calls each expert
served. ``digits_classifier`` is a logistic regression on scikit-learn's digits,
which is 97% accurate on held-out digits: enough to tell a 7 from noise;
``source_classifier`` the evaluate stage's feature net for any other labelled source.
``scripts/grow_experiment.py`` runs the whole experiment (a run on some classes,
grown by the others) and prints these figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ddm.images import to_uint8
from ddm.sampling.ensemble_loading import load_ensemble
from ddm.sampling.solvers import sample
from ddm.settings import Data, changed


def class_rates(
    run_dir,
    classes: Sequence[int],
    classify: Callable[[np.ndarray], np.ndarray],
    *,
    per_class: int = 50,
    steps: int = 20,
    solver: str = "euler",
    cfg_scale: float = 1.5,
    seed: int = 0,
    group: Sequence[int] = (),
) -> dict[int, dict]:
    """``{class: {accuracy, in_group, experts: {expert id: share of the rows it served}}}``, ``per_class`` samples each.

    ``accuracy``: the fraction classified as the requested class; ``in_group``: as any class of ``group``
    (e.g. the classes a run grew by: did the new expert draw new classes, whichever).
    """
    ensemble, path, info = load_ensemble(run_dir, "top1")
    channels, size = int(info.in_channels), int(info.image_size)
    out = {}
    for c in classes:
        ensemble.reset_usage()
        x = sample(
            ensemble,
            path,
            (per_class, channels, size, size),
            y=torch.full((per_class,), int(c), dtype=torch.long),
            steps=steps,
            solver=solver,
            cfg_scale=cfg_scale,
            generator=torch.Generator().manual_seed(seed * 1000 + int(c)),
        )
        served = np.zeros(info.num_experts)
        for record in ensemble.usage:
            served += np.asarray(record["counts"])
        predicted = np.asarray(classify(to_uint8(x)))
        out[int(c)] = dict(
            accuracy=float((predicted == int(c)).mean()),
            in_group=float(np.isin(predicted, list(group)).mean()),
            experts={k: float(n / served.sum()) for k, n in enumerate(served)},
        )
    return out


def digits_classifier() -> Callable[[np.ndarray], np.ndarray]:
    """uint8 8x8 digit images (as ``ddm prepare`` stores them) -> predicted digit, by logistic regression."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # the digits source's scaling
    model = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1) / 255.0, bunch.target)

    def classify(batch: np.ndarray) -> np.ndarray:
        return model.predict(np.asarray(batch, dtype=np.float64).reshape(len(batch), -1) / 255.0)

    return classify


def source_classifier(cfg_data: Data, seed: int, cache_dir, steps: int = 1000, limit: int = 20000):
    """A classifier of any labelled source: the evaluate stage's feature net, trained on ``limit`` images of
    every class of ``cfg_data``'s source (``data.classes`` ignored), cached by checksum."""
    from ddm.data.sources import open_source
    from ddm.eval import feature_net as fnet

    data = changed(cfg_data, {"classes": None, "limit": int(limit)})
    source = open_source(data, seed)
    samples = list(source.samples)
    images = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples])
    trained = fnet.train_feature_net((images, labels), source.meta.num_classes, cache_dir=cache_dir, steps=steps)

    def classify(batch: np.ndarray) -> np.ndarray:
        return fnet.predict(trained.net, np.asarray(batch))

    return classify
