"""FLOP accounting: measured forward FLOPs per network, training FLOPs, sampling FLOPs per image.

Forward FLOPs are counted by ``torch.utils.flop_counter`` (matmuls, convolutions
and attention; a multiply-add is 2 FLOPs; elementwise ops are not counted, as
in the DiT paper's GFLOPs). Training FLOPs are 3 x forward per sample seen
(forward plus a backward of about twice its cost).

Sampling FLOPs per image follow from how ``Ensemble`` and ``sample`` execute::

    calls       = steps (euler) | 2 * steps - 1 (heun: its last step is Euler)
    experts     = 1 (top1) | top_k (topk) | K (full) | 1 (sample)   expert evaluations per call
    cfg_factor  = 2 when guidance is on (cfg_scale != 1, conditional model): each
                  selected expert runs on the doubled batch; the router runs
                  once, on the conditional input
    per_image   = calls * (router + experts * cfg_factor * expert)

``measured_sampling_flops`` runs a real sampling call under the counter to
check the formula.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddm.sampling.solvers import num_evaluations, sample

EXPERTS_PER_CALL = {"top1": lambda K, k: 1, "topk": lambda K, k: k, "full": lambda K, k: K, "sample": lambda K, k: 1}


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` under torch's FLOP counter (no gradients)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def model_forward_flops(model: torch.nn.Module, image_shape: Sequence[int], conditional: bool = True,
                        batch: int = 1) -> int:
    """Forward FLOPs per sample of a ``model(x, t, y)`` (an expert or a router) on images ``image_shape`` (C, H, W)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch, *image_shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if conditional else None
    return count_flops(model, x, t, y) // batch


def sampling_flops_per_image(expert_flops: float, router_flops: float, strategy: str | None, steps: int,
                             solver: str = "euler", cfg_scale: float = 1.0, conditional: bool = True,
                             num_experts: int = 1, top_k: int = 2) -> dict:
    """FLOPs to sample one image; ``strategy=None`` is a single model (a monolith: no router).

    ``expert_flops`` is the forward FLOPs of one expert per sample (the mean when
    experts differ). Returns the total and its factors, so a report can show them.
    """
    calls = num_evaluations(int(steps), solver)
    cfg_factor = 2 if conditional and float(cfg_scale) != 1.0 else 1
    if strategy is None:
        experts, router_flops = 1, 0
    elif strategy not in EXPERTS_PER_CALL:
        raise ValueError(f"strategy={strategy!r} is not one of {sorted(EXPERTS_PER_CALL)}")
    else:
        experts = EXPERTS_PER_CALL[strategy](int(num_experts), int(top_k))
    per_call = router_flops + experts * cfg_factor * expert_flops
    return dict(per_image=int(round(calls * per_call)), per_call=int(round(per_call)), calls=calls,
                experts_per_call=experts, cfg_factor=cfg_factor, router_per_call=int(router_flops),
                expert_forward=int(round(expert_flops)))


def measured_sampling_flops(model, path, image_shape: Sequence[int], y: torch.Tensor | None, steps: int,
                            solver: str = "euler", cfg_scale: float = 1.0, seed: int = 0) -> int:
    """FLOPs per image of a real ``sample`` call on ``len(y)`` images (or 2 when unconditional), counted."""
    n = len(y) if y is not None else 2
    generator = torch.Generator().manual_seed(int(seed))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    flops = count_flops(sample, model, path, (n, *image_shape), y=y, steps=int(steps), solver=solver,
                        cfg_scale=float(cfg_scale), generator=generator, device=device)
    if hasattr(model, "reset_usage"):
        model.reset_usage()
    return flops // n


def training_flops(record: dict, forward_flops: int | None = None) -> tuple[int | None, bool]:
    """Training FLOPs of a job from its ``record.json``: ``(flops, estimated)``.

    Uses the record's ``train_flops`` when present; otherwise 3 x forward FLOPs
    per sample x ``samples_seen`` (``estimated=True``), with the record's
    ``forward_flops_per_sample`` or the measured ``forward_flops``.
    """
    if record.get("train_flops") is not None:
        return int(record["train_flops"]), False
    fwd = record.get("forward_flops_per_sample") or forward_flops
    seen = record.get("samples_seen")
    if fwd is None or seen is None:
        return None, True
    return int(3 * int(fwd) * int(seen)), True
