"""Experts kept in host memory and moved to the device only when a batch is routed to them.

K experts of a DDM may not fit on one card together, but sparse routing runs few
of them per model call. ``OffloadedExperts`` keeps every expert's weights in host
memory (pinned on CUDA, so copies are asynchronous) and keeps at most
``budget_bytes`` of them on the device, least recently used evicted first.

Sampling does not change the weights, so eviction re-points each tensor at its
host copy instead of copying it back: moving in costs one host-to-device copy,
moving out costs nothing. On the CPU the host and the device are the same memory,
and the bookkeeping (moves, resident set, peaks) is kept the same way, so it can
be checked without a GPU.

The ensemble visits the experts routed in one call resident ones first, and each
exactly once, so an expert moves at most once per model call; its results are
still summed in expert-id order, so offloading never changes a bit of the output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ddm.errors import BadInput

GB = 1024**3


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class OffloadedExperts:
    """A device cache of experts keyed by expert id.

    Args:
        experts: ``id -> module``; their tensors are moved to host memory here.
        device: where a routed expert runs.
        budget_bytes: the most expert bytes on the device at once; None: the
            largest expert's (one expert at a time, the least device memory).

    Counters: ``moves`` (host-to-device moves in all), ``moves_per_call`` and
    ``experts_per_call`` (per model call, i.e. per solver evaluation),
    ``peak_resident_bytes`` and ``peak_resident_params``.
    """

    def __init__(self, experts: Mapping[int, nn.Module], device, budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.modules = {int(k): m for k, m in experts.items()}
        pin = self.device.type == "cuda"
        self._host: dict[int, list[torch.Tensor]] = {}
        self.bytes, self.params = {}, {}
        for k, m in self.modules.items():
            host = [t.data.to("cpu") for t in _tensors(m)]
            host = [h.pin_memory() for h in host] if pin else host
            for t, h in zip(_tensors(m), host, strict=True):
                t.data = h
            self._host[k] = host
            self.bytes[k] = sum(h.numel() * h.element_size() for h in host)
            self.params[k] = sum(p.numel() for p in m.parameters())
        largest = max(self.bytes.values(), default=0)
        self.budget_bytes = largest if budget_bytes is None else int(budget_bytes)
        if self.budget_bytes < largest:
            raise BadInput(
                f"sample.offload_budget_gb={self.budget_bytes / GB:.3g} is below one expert's "
                f"{largest / GB:.3g} GB: raise it, or set it to null (one expert at a time)"
            )
        self.resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.moves = 0
        self.moves_per_call: list[int] = []
        self.experts_per_call: list[int] = []
        self.peak_resident_bytes = self.peak_resident_params = 0

    # ---- what the ensemble calls ------------------------------------------------------
    def order(self, ids: Sequence[int]) -> list[int]:
        """``ids`` to visit in one call: the resident ones first, so none is evicted before its turn."""
        return [k for k in ids if k in self.resident] + [k for k in ids if k not in self.resident]

    def begin_call(self) -> None:
        self.moves_per_call.append(0)
        self.experts_per_call.append(0)

    def fetch(self, k: int) -> nn.Module:
        """Expert ``k`` on the device, moved there (evicting the least recently used) if it is not."""
        if not self.moves_per_call:
            self.begin_call()
        self.experts_per_call[-1] += 1
        if k in self.resident:
            self.resident.move_to_end(k)
            return self.modules[k]
        while self.resident and self.resident_bytes + self.bytes[k] > self.budget_bytes:
            self._evict(next(iter(self.resident)))
        for t, h in zip(_tensors(self.modules[k]), self._host[k], strict=True):
            t.data = h.to(self.device, non_blocking=True)
        self.resident[k] = None
        self.moves += 1
        self.moves_per_call[-1] += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.peak_resident_params = max(self.peak_resident_params, self.resident_params)
        return self.modules[k]

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return sum(self.bytes[k] for k in self.resident)

    @property
    def resident_params(self) -> int:
        return sum(self.params[k] for k in self.resident)

    def _evict(self, k: int) -> None:
        # the weights are unchanged while sampling: point back at the host copy, nothing to copy out
        for t, h in zip(_tensors(self.modules[k]), self._host[k], strict=True):
            t.data = h
        del self.resident[k]

    def evict_all(self) -> None:
        for k in list(self.resident):
            self._evict(k)

    def summary(self) -> dict:
        calls = len(self.moves_per_call)
        return dict(
            moves=self.moves,
            calls=calls,
            max_moves_per_call=max(self.moves_per_call, default=0),
            peak_resident_gb=self.peak_resident_bytes / GB,
            peak_resident_params=self.peak_resident_params,
            budget_gb=self.budget_bytes / GB,
        )


class FetchedExpert(nn.Module):
    """Expert ``k`` of an ``OffloadedExperts`` as a model of its own, fetched to the device at each call.

    For what calls one expert alone (the evaluation's per-expert flow-matching loss): the cache's bookkeeping
    counts each call as one model call.
    """

    def __init__(self, cache: OffloadedExperts, k: int):
        super().__init__()
        self._cache, self.k = cache, int(k)  # the cache is no module: the expert's weights stay the cache's

    @property
    def num_classes(self):
        return getattr(self._cache.modules[self.k], "num_classes", None)

    def forward(self, x, t, y=None):
        self._cache.begin_call()
        return self._cache.fetch(self.k)(x, t, y)


def offload(ensemble, device, budget_gb: float | None = None):
    """Keep ``ensemble``'s experts in host memory, cached on ``device`` up to ``budget_gb``; the router on ``device``.

    Returns the ensemble (changed in place). Do not call ``ensemble.to(device)`` afterwards: that would move
    every expert to the device again.
    """
    if budget_gb is not None and float(budget_gb) <= 0:
        raise BadInput(f"sample.offload_budget_gb={budget_gb} must be positive, or null (one expert at a time)")
    budget = None if budget_gb is None else int(float(budget_gb) * GB)
    experts = {int(k): m for k, m in ensemble.experts.items()}
    ensemble.offload = OffloadedExperts(experts, device, budget)
    ensemble.router.to(device)
    return ensemble
