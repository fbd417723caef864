"""The cluster router's FLOPs: its encoder as a countable model, and its cost per model call."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn


class EncoderAsModel(nn.Module):
    """An ``embed(x)`` called as ``model(x, t, y)``: what ``ddm.eval.flops.model_forward_flops`` counts.

    ``model_forward_flops(EncoderAsModel(router.embed), image_shape, conditional=False)`` is the encoder's forward
    FLOPs per image on model-space images (C, H, W); a latent run's ``ModelSpaceEmbedder`` counts its decoder too.
    (Counted there, not here: this module stays below ``ddm.eval``, so ``ddm.sampling`` may build the router.)
    """

    def __init__(self, embed: Callable):
        super().__init__()
        self.embed = embed

    def forward(self, x, t=None, y=None):
        return self.embed(x)


def routing_calls(calls: int, every: int = 1) -> int:
    """How many of a trajectory's ``calls`` model calls run the encoder: calls 1, 1 + every, ... (the first call,
    at t = 1, routes by the class composition alone)."""
    return 0 if calls <= 1 else (calls - 2) // int(every) + 1


def router_flops_per_call(encoder_flops: float, num_centroids: int, dim: int, calls: int, every: int = 1) -> float:
    """The cluster router's FLOPs per image and model call, averaged over a trajectory's ``calls``: the encoder
    plus the distances to ``num_centroids`` centroids of ``dim`` numbers (``2 * M * D``) on ``routing_calls`` of
    them. What ``ddm.eval.flops.sampling_flops_per_image`` takes as ``router_flops``; separate guidance routing
    embeds each sample once, its null row reusing it, so that formula's doubled router must not apply to it."""
    if calls <= 0:
        return 0.0
    return routing_calls(calls, every) * (float(encoder_flops) + 2.0 * num_centroids * dim) / calls
