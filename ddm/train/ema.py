"""Exponential moving average of weights: the experts are sampled with their EMA."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the decay up, (1 + step) / (10 + step), so a short run's EMA is not dominated by the init."""
    return min(decay, (1.0 + step) / (10.0 + step))
