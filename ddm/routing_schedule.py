"""Routing that follows the noise: a schedule of strategies over t, written where a strategy is.

A schedule names strategies and the t where one hands over to the next, read as
the sampler runs, from noise (t = 1) to data (t = 0), separated by colons::

    full:0.6:top1               the full ensemble on calls with t > 0.6, top-1 on calls with t <= 0.6
    topk:0.8:sample:0.3:top1    top-k above 0.8, one expert drawn per sample down to 0.3, then top-1

A plain strategy name (``top1``) is a schedule of one piece, so a schedule goes
wherever a strategy goes: ``sample.strategy``, ``eval.strategies``, the paper
table's ``paper.strategies``, and the labels of samples and metrics.

Switch points must fall strictly inside (0, 1) and decrease. The comparison
``t <= switch`` is made in the dtype of the t the model is called with
(float32), so a switch written as 0.6 is the float32 0.6 the time grid holds,
and ``strategy_at`` (the FLOP formula's count of calls per piece) decides every
call exactly as the ensemble does.

The pieces take the strategies of fixed cost, ``SCHEDULABLE``: a FLOP count of a
schedule is then a property of its settings. ``threshold`` and ``nucleus``,
whose number of experts is measured from the images sampled, are refused in a
schedule (use them on their own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddm.errors import BadInput
from ddm.routing import STRATEGIES, select_experts

SEPARATOR = ":"
SCHEDULABLE = ("top1", "topk", "full", "sample")
# Strategies whose weights are one-hot: their velocity is the chosen expert's, not multiplied by a weight.
ONE_HOT = ("top1", "sample")


@dataclass(frozen=True)
class Schedule:
    """Strategies from t = 1 down, and the t where each hands over to the next (``len(switches) = pieces - 1``)."""

    strategies: tuple[str, ...]
    switches: tuple[float, ...] = ()

    @property
    def single(self) -> str | None:
        """The strategy when the schedule has one piece, else None."""
        return self.strategies[0] if len(self.strategies) == 1 else None

    @property
    def first(self) -> str:
        """The strategy at t = 1, the call that picks each trajectory's experts first."""
        return self.strategies[0]

    @property
    def one_hot(self) -> bool:
        """True when every piece gives one expert per sample with weight 1 (the velocity is that expert's)."""
        return all(s in ONE_HOT for s in self.strategies)

    def uses(self, strategy: str) -> bool:
        return strategy in self.strategies

    def piece_index(self, t: torch.Tensor) -> torch.Tensor:
        """[B] index of the piece each row's t falls in: the number of switch points at or above it."""
        if not self.switches:
            return torch.zeros(t.shape, dtype=torch.long, device=t.device)
        switches = torch.tensor(self.switches, dtype=t.dtype, device=t.device)
        return (t.unsqueeze(-1) <= switches).sum(dim=-1)

    def strategy_at(self, t: float) -> str:
        """The strategy of a model call at ``t`` (compared in float32, as the sampler's t are)."""
        return self.strategies[int(self.piece_index(torch.tensor([float(t)], dtype=torch.float32))[0])]

    def __str__(self) -> str:
        parts = [self.strategies[0]]
        for s, name in zip(self.switches, self.strategies[1:]):
            parts += [f"{s:g}", name]
        return SEPARATOR.join(parts)


def parse_strategy(spec, key: str = "sample.strategy") -> Schedule:
    """A strategy name or a schedule (``full:0.6:top1``) -> ``Schedule``; an error names ``key`` and what is wrong."""
    text = str(spec).strip()
    parts = [p.strip() for p in text.split(SEPARATOR)]
    if len(parts) == 1:
        if parts[0] not in STRATEGIES:
            raise BadInput(
                f"{key}={text!r} is not one of {STRATEGIES}, nor a schedule such as 'full:0.6:top1' "
                f"(full above t = 0.6, top-1 at and below it)"
            )
        return Schedule((parts[0],))
    if len(parts) % 2 == 0:
        raise BadInput(
            f"{key}={text!r}: the schedule must alternate strategies and switch points and end with a strategy, "
            f"e.g. 'full:0.6:top1' or 'topk:0.8:sample:0.3:top1'"
        )
    strategies, switches = tuple(parts[0::2]), []
    for name in strategies:
        if name not in SCHEDULABLE:
            raise BadInput(
                f"{key}={text!r}: {name!r} cannot be a piece of a schedule; pieces are {SCHEDULABLE} (threshold and "
                f"nucleus cost what the images ask for, so their FLOPs are measured on their own)"
            )
    for value in parts[1::2]:
        try:
            switches.append(float(value))
        except ValueError:
            raise BadInput(f"{key}={text!r}: switch point {value!r} is not a number") from None
    if not all(math.isfinite(s) and 0.0 < s < 1.0 for s in switches) or any(
        b >= a for a, b in zip(switches, switches[1:])
    ):
        raise BadInput(
            f"{key}={text!r}: switch points {switches} must lie strictly between 0 and 1 and decrease "
            f"(the sampler runs from t = 1, noise, to t = 0, data)"
        )
    return Schedule(strategies, tuple(switches))


def check_strategy(spec, key: str = "sample.strategy") -> str:
    """The strategy or schedule ``spec`` checked, in its canonical spelling (``full:0.6:top1``)."""
    return str(parse_strategy(spec, key))


def canonical_label(label) -> str:
    """A routing strategy or schedule in its one spelling; any other label (``distilled``) as it is."""
    return check_strategy(label) if is_strategy(label) else str(label)


def is_strategy(spec) -> bool:
    """True when ``spec`` is a routing strategy or a schedule of them."""
    try:
        parse_strategy(spec)
    except BadInput:
        return False
    return True


def select_scheduled(probs, t, schedule: Schedule, top_k=2, threshold=0.1, top_p=0.9, generator=None):
    """``select_experts`` with each row under the piece of ``schedule`` its ``t`` [B] falls in.

    Every piece is evaluated on every row and the rows are picked on the device, so a schedule costs no host
    sync (the router's probabilities are [B, K]); a ``sample`` piece draws for every row at every call, so the
    draws do not depend on which rows use it.
    """
    piece = schedule.piece_index(t).unsqueeze(1)
    selected, weights = None, None
    for i, name in enumerate(schedule.strategies):
        sel, w = select_experts(probs, name, top_k, threshold, top_p, generator)
        if selected is None:
            selected, weights = sel, w
        else:
            selected, weights = torch.where(piece == i, sel, selected), torch.where(piece == i, w, weights)
    return selected, weights
