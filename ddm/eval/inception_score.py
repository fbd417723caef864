"""The Inception Score (Salimans et al. 2016) from class probabilities, as the original TensorFlow code computes it.

The images are cut into ``splits`` consecutive parts (10 in the original code and
in papers' tables); for each part, ``exp(mean_i KL(p(y|x_i) || p(y)))`` with
``p(y)`` the part's mean prediction; the score is the mean over the parts, and
their standard deviation is reported beside it. Uniform predictions give 1;
confident predictions spread evenly over C classes give C. The value depends on
the number of images per part: compare scores of equally many images only.
"""

from __future__ import annotations

import numpy as np

from ddm.errors import BadInput

SPLITS = 10


def inception_score(probs: np.ndarray, splits: int = SPLITS) -> dict:
    """``{mean, std, splits, num_images}`` of the Inception Score of class probabilities ``probs`` [N, C].

    ``splits`` is lowered to N when there are fewer images than parts (each part needs one image).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise BadInput(f"the Inception Score needs class probabilities [N, C] with N >= 1, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise BadInput("the Inception Score needs probabilities: non-negative rows that sum to 1 (softmax the logits)")
    n = min(int(splits), len(p))
    if n < 1:
        raise BadInput(f"eval.inception_score_splits={splits}: use a positive number of parts (10 is the standard)")
    scores = []
    for i in range(n):
        part = p[i * len(p) // n : (i + 1) * len(p) // n]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: a class a prediction gives no mass adds nothing (where part > 0, so is the marginal)
        positive = part > 0
        ratio = np.where(positive, part, 1.0) / np.where(positive, marginal, 1.0)
        kl = np.where(positive, part * np.log(ratio), 0.0)
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return dict(mean=float(np.mean(scores)), std=float(np.std(scores)), splits=n, num_images=len(p))
