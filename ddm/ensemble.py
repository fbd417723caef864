"""The sampling-time model of a DDM: K experts combined by a router.

Decentralized Flow Matching: the global marginal flow is

    v(x_t, t) = sum_k p(k | x_t, t) * v_k(x_t, t)

where ``v_k`` is expert k's flow (trained on cluster k only) and ``p(k | x_t, t)``
is the router's posterior. ``Ensemble`` has the interface of a single expert
(``forward(x, t, y)``, ``forward_with_cfg(x, t, y, scale)``, ``num_classes``),
so one sampler serves a monolith and an ensemble alike.

Routing strategies (the router is re-evaluated at every call, i.e. every
solver evaluation):

- ``top1``: the most probable expert only (the paper's best FID);
- ``topk``: the ``top_k`` most probable experts, weights renormalised over them;
- ``full``: every expert, weighted by the router (the exact identity above);
- ``sample``: one expert per sample drawn from the router's probabilities.

Sparse strategies run each selected expert once on exactly the samples routed
to it, so the cost per call is about that of one expert plus the router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ddm.errors import BadInput
from ddm.models.velocity import Router, VelocityModel, guided_velocity, num_classes_of

STRATEGIES = ("top1", "topk", "full", "sample")


class Ensemble(VelocityModel):
    """Experts plus a router, behaving like one velocity model.

    Args:
        experts: a sequence (expert ``i`` has id ``i``) or a mapping ``id -> module``.
            A mapping may hold only some of the K experts when ``subset`` names
            the ones to use.
        router: ``r(x, t, y) -> [B, K]`` logits of p(k | x_t, t).
        strategy: one of ``top1``, ``topk``, ``full``, ``sample``.
        top_k: number of experts per sample for ``topk``.
        subset: expert ids to route among; the router's logits are restricted
            to them and renormalised (softmax over the subset).
        generator: random generator of the ``sample`` strategy.
        temperature: the router's logits are divided by it (1: the trained posterior).
        num_experts: K; by default ``router.num_outputs``, else the number of experts.
    """

    def __init__(
        self,
        experts: Sequence[VelocityModel] | Mapping[int, VelocityModel],
        router: Router,
        strategy: str = "top1",
        top_k: int = 2,
        subset: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        num_experts: int | None = None,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise BadInput(f"sample.strategy={strategy!r} is not one of {STRATEGIES}")
        if temperature <= 0:
            raise BadInput(f"router temperature={temperature} must be positive")
        given = dict(experts) if isinstance(experts, Mapping) else dict(enumerate(experts))
        given = {int(k): m for k, m in given.items()}
        self.num_experts = int(num_experts or getattr(router, "num_outputs", None) or (max(given) + 1 if given else 0))
        self.active_ids = _active_ids(given, self.num_experts, subset)
        self.experts = nn.ModuleDict({str(k): given[k] for k in self.active_ids})
        self.router = router
        self.strategy, self.top_k = strategy, int(top_k)
        if strategy == "topk" and not 1 <= self.top_k <= len(self.active_ids):
            raise BadInput(f"sample.top_k={top_k} must be between 1 and the {len(self.active_ids)} experts in use")
        self.generator, self.temperature = generator, float(temperature)
        # Restricting logits to a subset is an index_select; None means "all K, in order".
        full_set = self.active_ids == list(range(self.num_experts))
        self.register_buffer("_subset_index", None if full_set else torch.tensor(self.active_ids), persistent=False)
        self._num_classes = _common_num_classes(self.experts.values())
        self.usage: list[dict] = []

    # ---- the expert interface -------------------------------------------------------
    @property
    def num_classes(self):
        return self._num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Ensemble velocity at (x_t, t) for labels y (None: unconditional)."""
        return self._combine(x, t, y, scale=None)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, scale: float):
        """Classifier-free guidance, routed once on the conditional input.

        Each selected expert guides its own samples, so the conditional and
        unconditional halves of a sample always come from the same expert.
        """
        return self._combine(x, t, y, scale=scale)

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy!r}, top_k={self.top_k}, experts={self.active_ids}, "
            f"num_experts={self.num_experts}, temperature={self.temperature}"
        )

    # ---- routing --------------------------------------------------------------------
    def route(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """Run the router once: ``(selected [B, n] bool, weights [B, n])`` over ``active_ids``.

        ``weights`` rows sum to 1 and are zero where an expert is not selected.
        """
        t = _as_batch_t(t, x)
        logits = self.router(x, t, y)
        if logits.shape[-1] != self.num_experts:
            raise BadInput(f"the router gave {logits.shape[-1]} logits but the ensemble has {self.num_experts} experts")
        if self._subset_index is not None:
            logits = logits.index_select(1, self._subset_index)
        # fp32 even under autocast: bf16 probabilities would tie near-equal experts and bias top-1
        probs = (logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature).softmax(dim=-1)
        return self._select(probs)

    def _select(self, probs: torch.Tensor):
        b, n = probs.shape
        if self.strategy == "full":
            return torch.ones_like(probs, dtype=torch.bool), probs
        if self.strategy == "top1":
            chosen = probs.argmax(dim=-1, keepdim=True)
        elif self.strategy == "sample":
            chosen = _multinomial(probs, self.generator)
        else:
            chosen = probs.topk(self.top_k, dim=-1).indices
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
        if self.strategy == "topk":
            weights = torch.where(selected, probs, torch.zeros_like(probs))
            weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            weights = selected.to(probs.dtype)
        return selected, weights

    # ---- sparse execution -----------------------------------------------------------
    def _combine(self, x, t, y, scale):
        t = _as_batch_t(t, x)
        selected, weights = self.route(x, t, y)
        counts = self._record_usage(t, selected, weights)
        out = torch.zeros_like(x)
        # Exact one-hot strategies skip the multiply so they equal the chosen expert bit for bit.
        weighted = self.strategy in ("topk", "full")
        for j, k in enumerate(self.active_ids):
            if counts[k] == 0:
                continue  # no sample routed here: the expert is not run at all
            expert = self.experts[str(k)]
            if counts[k] == x.shape[0]:
                v = guided_velocity(expert, x, t, y, scale)
                out = out + (v * _bc(weights[:, j], v) if weighted else v)
                continue
            idx = selected[:, j].nonzero().squeeze(1)
            v = guided_velocity(
                expert,
                x.index_select(0, idx),
                t.index_select(0, idx),
                None if y is None else y.index_select(0, idx),
                scale,
            )
            if weighted:
                v = v * _bc(weights.index_select(0, idx)[:, j], v)
            out.index_add_(0, idx, v.to(out.dtype))
        return out

    # ---- usage ----------------------------------------------------------------------
    def _record_usage(self, t, selected, weights) -> list[int]:
        """Append one usage record and return the per-expert sample counts (by expert id).

        One ``.tolist()`` per call: the counts are needed on the host anyway to
        skip idle experts, so t and the mean weights ride along for free.
        """
        n = len(self.active_ids)
        stats = torch.cat(
            [selected.sum(dim=0).to(weights.dtype), weights.mean(dim=0), t.mean().reshape(1).to(weights.dtype)]
        ).tolist()
        counts = [0] * self.num_experts
        mean_w = [0.0] * self.num_experts
        for j, k in enumerate(self.active_ids):
            counts[k], mean_w[k] = int(round(stats[j])), stats[n + j]
        self.usage.append(dict(t=stats[-1], counts=counts, weights=mean_w))
        return counts

    def reset_usage(self) -> None:
        self.usage = []


def _active_ids(given: dict, num_experts: int, subset) -> list[int]:
    """The expert ids to route among, checked against the experts supplied."""
    out_of_range = sorted(k for k in given if not 0 <= k < num_experts)
    if out_of_range:
        raise BadInput(
            f"expert ids {out_of_range} are outside 0..{num_experts - 1} (the router has {num_experts} outputs)"
        )
    if subset is None:
        missing = [k for k in range(num_experts) if k not in given]
        if missing:
            raise BadInput(
                f"experts {missing} of {num_experts} are missing; pass subset=[...] "
                f"(sample.experts) to route among the experts you have"
            )
        return list(range(num_experts))
    subset = sorted({int(k) for k in subset})
    if not subset:
        raise BadInput("sample.experts (subset) is empty: name at least one expert id")
    missing = [k for k in subset if k not in given]
    if missing:
        raise BadInput(f"subset names experts {missing} but only {sorted(given)} were given")
    return subset


def _common_num_classes(experts) -> int | None:
    values = {num_classes_of(e) for e in experts}
    if len(values) > 1:
        raise BadInput(
            f"the experts disagree on num_classes ({sorted(values, key=str)}): they must "
            f"all be trained on the same label set"
        )
    return values.pop() if values else None


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row; drawn where the generator lives so seeds reproduce across devices."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def _as_batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time -> a [B] tensor on x's device."""
    t = torch.as_tensor(t, device=x.device)
    if not torch.is_floating_point(t):
        t = t.to(x.dtype)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def _bc(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, *([1] * (v.dim() - 1))).to(v.dtype)
