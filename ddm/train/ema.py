"""Exponential moving average of weights: the experts are sampled with their EMA.

Under FSDP (``ddm.train.fsdp``) the EMA is sharded like the network it follows:
each parameter is then a ``DTensor`` whose local slice sits beside the same
slice of the live parameter, and the update below acts on those slices alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


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


def _layout(p: torch.Tensor) -> tuple:
    if isinstance(p, DTensor):
        return tuple(p.shape), tuple(p.to_local().shape), p.device_mesh, tuple(p.placements)
    return tuple(p.shape), tuple(p.shape), None, None


def check_same_layout(ema: nn.Module, model: nn.Module) -> None:
    """Fail unless every EMA parameter has the shape and sharding of the model parameter it follows.

    An EMA sharded otherwise than its network (or not at all) would mix slices
    of different elements, or fail only at the first update.
    """
    ema_params, params = list(ema.named_parameters()), list(model.named_parameters())
    if [n for n, _ in ema_params] != [n for n, _ in params]:
        raise RuntimeError("the EMA's parameters are not those of the network it follows")
    for (name, e), (_, p) in zip(ema_params, params):
        if _layout(e) != _layout(p):
            raise RuntimeError(f"EMA parameter {name} is laid out as {_layout(e)}, the network's as {_layout(p)}")


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the decay up, (1 + step) / (10 + step), so a short run's EMA is not dominated by the init."""
    return min(decay, (1.0 + step) / (10.0 + step))
