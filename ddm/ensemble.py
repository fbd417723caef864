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
- ``sample``: one expert per sample drawn from the router's probabilities;
- ``threshold``: every expert whose probability is at least ``threshold``, and
  always the most probable one, weights renormalised over them;
- ``nucleus``: the smallest set of experts whose probabilities sum to at least
  ``top_p`` (most probable first, ties to the lower expert id), renormalised;
- a schedule of them over t, e.g. ``full:0.6:top1`` (``ddm.routing_schedule``): each
  row of a call is routed by the piece its t falls in.

Sparse strategies run each selected expert once on exactly the samples routed
to it, so the cost per call is about that of one expert plus the router. Under
``threshold`` and ``nucleus`` the number of experts per sample depends on the
router's confidence, so it changes from sample to sample and step to step (the
usage records count it).

Classifier-free guidance, ``cfg_routing``:

- ``shared``: the router sees the conditional input only; each selected expert
  guides its own samples (conditional and null input in one doubled batch), so
  both halves of a sample come from the same experts with the same weights;
- ``separate``: the null input (null label, or the captions flagged null) is
  routed on its own, in the same router call as the conditional one (a doubled
  batch), and the unconditional velocity is the combination of the experts the
  router picks for it. Each expert still runs once per call, on the conditional
  and null rows routed to it together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ddm.errors import BadInput
from ddm.models.conditioning import TextCondition, cat_conditions
from ddm.models.velocity import Router, VelocityModel, guided_velocity, num_classes_of
from ddm.routing import (  # re-exported: the routing rules are part of the ensemble's interface
    CFG_ROUTINGS,
    DATA_DEPENDENT,
    ROUTING_DEFAULTS,
    STRATEGIES,
    check_routing,
    select_experts,
)
from ddm.routing_schedule import parse_strategy, select_scheduled

__all__ = [
    "CFG_ROUTINGS",
    "DATA_DEPENDENT",
    "ROUTING_DEFAULTS",
    "STRATEGIES",
    "Ensemble",
    "check_routing",
    "experts_per_sample",
    "select_experts",
]


class Ensemble(VelocityModel):
    """Experts plus a router, behaving like one velocity model.

    Args:
        experts: a sequence (expert ``i`` has id ``i``) or a mapping ``id -> module``.
            A mapping may hold only some of the K experts when ``subset`` names
            the ones to use.
        router: ``r(x, t, y) -> [B, K]`` logits of p(k | x_t, t). One with an ``observe(x, t, y, v)`` method
            is given the ensemble's velocity ``v`` after every call (``ddm.cluster_router.ClusterRouter``).
        strategy: one of ``STRATEGIES``, or a schedule of them over t such as ``full:0.6:top1`` (see the module
            docstring and ``ddm.routing_schedule``).
        top_k: number of experts per sample for ``topk``.
        subset: expert ids to route among; the router's logits are restricted
            to them and renormalised (softmax over the subset).
        generator: random generator of the ``sample`` strategy.
        temperature: the router's logits are divided by it (1: the trained posterior).
        num_experts: K; by default ``router.num_outputs``, else the number of experts.
        threshold: ``threshold``: the least router probability of a selected expert, in [0, 1].
        top_p: ``nucleus``: the probability mass the selected experts cover, in (0, 1].
        cfg_routing: ``shared`` (guidance's null input follows the conditional routing) or
            ``separate`` (the null input is routed on its own).
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
        threshold: float = ROUTING_DEFAULTS["threshold"],
        top_p: float = ROUTING_DEFAULTS["top_p"],
        cfg_routing: str = ROUTING_DEFAULTS["cfg_routing"],
    ):
        super().__init__()
        self.schedule = parse_strategy(strategy)
        strategy = str(self.schedule)
        if temperature <= 0:
            raise BadInput(f"router temperature={temperature} must be positive")
        given = dict(experts) if isinstance(experts, Mapping) else dict(enumerate(experts))
        given = {int(k): m for k, m in given.items()}
        self.num_experts = int(num_experts or getattr(router, "num_outputs", None) or (max(given) + 1 if given else 0))
        self.active_ids = _active_ids(given, self.num_experts, subset)
        self.experts = nn.ModuleDict({str(k): given[k] for k in self.active_ids})
        self.router = router
        self.strategy, self.top_k = strategy, int(top_k)
        if self.schedule.uses("topk") and not 1 <= self.top_k <= len(self.active_ids):
            raise BadInput(f"sample.top_k={top_k} must be between 1 and the {len(self.active_ids)} experts in use")
        self.generator, self.temperature = generator, float(temperature)
        self.threshold, self.top_p, self.cfg_routing = check_routing(threshold, top_p, cfg_routing)
        # Restricting logits to a subset is an index_select; None means "all K, in order".
        full_set = self.active_ids == list(range(self.num_experts))
        self.register_buffer("_subset_index", None if full_set else torch.tensor(self.active_ids), persistent=False)
        self._num_classes = _common_num_classes(self.experts.values())
        self.usage: list[dict] = []
        self.offload = None  # an OffloadedExperts (ddm.sampling.offload): experts on the host, fetched when routed

    # ---- the expert interface -------------------------------------------------------
    @property
    def num_classes(self):
        return self._num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Ensemble velocity at (x_t, t) for labels y (None: unconditional)."""
        return self._combine(x, t, y, scale=None)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, scale: float):
        """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)``, routed as ``cfg_routing`` says.

        ``shared``: routed once on the conditional input; each selected expert
        guides its own samples, so the conditional and unconditional halves of a
        sample always come from the same experts. ``separate``: the null input is
        routed on its own, and ``v_uncond`` combines the experts chosen for it.
        """
        return self._combine(x, t, y, scale=scale)

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy!r}, top_k={self.top_k}, threshold={self.threshold}, top_p={self.top_p}, "
            f"experts={self.active_ids}, num_experts={self.num_experts}, temperature={self.temperature}, "
            f"cfg_routing={self.cfg_routing!r}"
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
            logits = logits.index_select(1, self._subset_index.to(logits.device))
        # fp32 even under autocast: bf16 probabilities would tie near-equal experts and bias top-1
        probs = (logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature).softmax(dim=-1)
        if self.schedule.single:
            return select_experts(probs, self.strategy, self.top_k, self.threshold, self.top_p, self.generator)
        return select_scheduled(
            probs, t.to(probs.device), self.schedule, self.top_k, self.threshold, self.top_p, self.generator
        )

    # ---- sparse execution -----------------------------------------------------------
    def _combine(self, x, t, y, scale):
        t = _as_batch_t(t, x)
        if self.cfg_routing == "separate" and scale is not None and scale != 1.0 and y is not None:
            v = self._combine_separately(x, t, y, float(scale))
        else:
            selected, weights = self.route(x, t, y)
            counts = self._record_usage(t, selected, weights)
            v = self._run_experts(x, t, y, selected, weights, counts, scale)
        observe = getattr(self.router, "observe", None)
        if observe is not None:  # a router that follows the trajectory (ddm.cluster_router) sees the velocity
            observe(x, t, y, v)
        return v

    def _combine_separately(self, x, t, y, scale: float):
        """Guidance with the null input routed on its own: one doubled batch, conditional rows first.

        The router sees the conditional and the null rows in one call; each expert
        runs once, unguided, on the rows of both halves routed to it.
        """
        n = x.shape[0]
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        y2 = cat_conditions([y, _null_condition(y, self._num_classes, scale)])
        selected, weights = self.route(x2, t2, y2)
        counts = self._record_usage(t, selected, weights, rows=n)
        v_cond, v_uncond = self._run_experts(x2, t2, y2, selected, weights, counts, None).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    def _run_experts(self, x, t, y, selected, weights, counts, scale):
        """Each expert with samples once, on exactly its rows (guided with ``scale``), weighted and summed.

        Offloaded (``self.offload``): the experts are visited in the cache's order (resident ones first) and
        fetched to the device one at a time, but always summed in expert-id order, so the result is the same.
        """
        out = torch.zeros_like(x)
        # Exact one-hot strategies skip the multiply so they equal the chosen expert bit for bit (a schedule with a
        # weighted piece multiplies its one-hot rows by exactly 1.0, which changes no bit either).
        weighted = not self.schedule.one_hot
        column = {k: j for j, k in enumerate(self.active_ids) if counts[k]}  # no sample routed: not run at all
        ids, pending = list(column), {}
        if self.offload is not None:
            self.offload.begin_call()
        for k in list(ids) if self.offload is None else self.offload.order(ids):
            j = column[k]
            expert = self.experts[str(k)] if self.offload is None else self.offload.fetch(k)
            idx = None if counts[k] == x.shape[0] else selected[:, j].nonzero().squeeze(1)
            if idx is None:
                v = guided_velocity(expert, x, t, y, scale)
                pending[k] = (None, v * _bc(weights[:, j], v) if weighted else v)
            else:
                pick = (x.index_select(0, idx), t.index_select(0, idx), None if y is None else y.index_select(0, idx))
                v = guided_velocity(expert, *pick, scale)
                pending[k] = (idx, v * _bc(weights.index_select(0, idx)[:, j], v) if weighted else v)
            while ids and ids[0] in pending:  # summed in id order: floating point sums depend on the order
                rows, v = pending.pop(ids.pop(0))
                out = out + v if rows is None else out.index_add_(0, rows, v.to(out.dtype))
        return out

    # ---- usage ----------------------------------------------------------------------
    def _record_usage(self, t, selected, weights, rows: int | None = None) -> list[int]:
        """Append one usage record and return the per-expert row counts of ``selected`` (by expert id).

        ``rows``: separate guidance routing, where ``selected`` holds ``rows``
        conditional rows, then as many null-input rows. The record's ``counts`` and
        ``weights`` are always the samples' own (conditional) routing, as for the
        other strategies; separate routing adds ``uncond_counts`` and ``uncond_weights``.

        One ``.tolist()`` per call: the counts are needed on the host anyway to
        skip idle experts, so t and the mean weights ride along for free.
        """
        n = len(self.active_ids)
        halves = (
            [(selected, weights)]
            if rows is None
            else [(selected[:rows], weights[:rows]), (selected[rows:], weights[rows:])]
        )
        parts = [p for sel, w in halves for p in (sel.sum(dim=0).to(w.dtype), w.mean(dim=0))]
        stats = torch.cat([*parts, t.mean().reshape(1).to(weights.dtype)]).tolist()
        record, total = dict(t=stats[-1]), [0] * self.num_experts
        for h, prefix in enumerate(["", "uncond_"][: len(halves)]):
            counts, mean_w = [0] * self.num_experts, [0.0] * self.num_experts
            for j, k in enumerate(self.active_ids):
                counts[k], mean_w[k] = int(round(stats[2 * h * n + j])), stats[(2 * h + 1) * n + j]
                total[k] += counts[k]
            record[f"{prefix}counts"], record[f"{prefix}weights"] = counts, mean_w
        self.usage.append(record)
        return total

    def reset_usage(self) -> None:
        self.usage = []


def experts_per_sample(usage: Sequence[Mapping], num_images: int, key: str = "counts") -> float | None:
    """The experts each sample ran on per model call, averaged over the calls in ``usage``.

    ``usage``: ``Ensemble.usage`` records, or records merged over the batches of
    ``num_images`` images (the sample stage's usage.json). ``key="uncond_counts"``:
    those of guidance's null input under separate routing. None without records.
    """
    records = [r for r in usage if key in r]
    if not records or not num_images:
        return None
    return sum(sum(r[key]) for r in records) / (len(records) * int(num_images))


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


def _null_condition(y, num_classes: int | None, scale: float):
    """Guidance's unconditional input: the captions flagged null, or the null label ``num_classes``."""
    if isinstance(y, TextCondition):
        return y.as_null()
    if not num_classes:
        raise BadInput(
            f"classifier-free guidance (scale {scale}) needs a conditional model: the experts have "
            f"num_classes={num_classes!r}; use cfg_scale=1"
        )
    return torch.full_like(y, num_classes)


def _common_num_classes(experts) -> int | None:
    values = {num_classes_of(e) for e in experts}
    if len(values) > 1:
        raise BadInput(
            f"the experts disagree on num_classes ({sorted(values, key=str)}): they must "
            f"all be trained on the same label set"
        )
    return values.pop() if values else None


def _as_batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time -> a [B] tensor on x's device."""
    t = torch.as_tensor(t, device=x.device)
    if not torch.is_floating_point(t):
        t = t.to(x.dtype)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def _bc(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, *([1] * (v.dim() - 1))).to(v.dtype)
