"""Which experts a sample goes to: the routing strategies, as pure functions of the router's probabilities.

``select_experts`` turns a batch of router probabilities into a boolean
selection [B, K] and the weights the ensemble combines velocities with;
``check_routing`` validates the options before anything is loaded.
"""

from __future__ import annotations

import torch

from ddm.errors import BadInput

STRATEGIES = ("top1", "topk", "full", "sample", "threshold", "nucleus")
# Strategies whose number of experts per sample depends on the router's output (FLOPs: from usage).
DATA_DEPENDENT = ("threshold", "nucleus")
CFG_ROUTINGS = ("shared", "separate")
# The defaults of sample.threshold, sample.top_p and sample.cfg_routing (conf/sample/default.yaml).
ROUTING_DEFAULTS = dict(threshold=0.1, top_p=0.9, cfg_routing="shared")


def check_routing(threshold=0.1, top_p=0.9, cfg_routing="shared") -> tuple[float, float, str]:
    """``(threshold, top_p, cfg_routing)`` checked: threshold in [0, 1], top_p in (0, 1], a known cfg routing.

    Every value is checked whatever the strategy, so a bad one fails before any sampling.
    """
    threshold = _number(threshold, "sample.threshold")
    if not 0.0 <= threshold <= 1.0:
        raise BadInput(
            f"sample.threshold={threshold} must be in [0, 1]: experts with at least this router probability "
            f"are used (0: every expert, as `full`)"
        )
    top_p = _number(top_p, "sample.top_p")
    if not 0.0 < top_p <= 1.0:
        raise BadInput(
            f"sample.top_p={top_p} must be in (0, 1]: the router probability mass the nucleus of experts "
            f"covers (1: every expert with a nonzero probability)"
        )
    if cfg_routing not in CFG_ROUTINGS:
        raise BadInput(f"sample.cfg_routing={cfg_routing!r} is not one of {CFG_ROUTINGS}")
    return threshold, top_p, str(cfg_routing)


def _number(value, key: str) -> float:
    if isinstance(value, bool):
        raise BadInput(f"{key}={value!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{key}={value!r} must be a number") from None


def select_experts(
    probs: torch.Tensor,
    strategy: str,
    top_k: int = 2,
    threshold: float = 0.1,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected [B, n] bool, weights [B, n])`` of router probabilities ``probs`` [B, n] under ``strategy``.

    ``weights`` rows sum to 1 and are zero where an expert is not selected. The
    renormalising strategies (``topk``, ``threshold``, ``nucleus``) divide the
    selected probabilities by their sum; ``threshold`` and ``nucleus`` keep a row
    that selects every expert as it is, so ``threshold=0`` is ``full`` exactly.
    """
    if strategy == "full":
        return torch.ones_like(probs, dtype=torch.bool), probs
    if strategy == "threshold":
        top = probs.argmax(dim=-1, keepdim=True)  # the first of equal maxima: always one expert
        selected = (probs >= threshold).scatter_(1, top, True)
        return selected, _renormalised(probs, selected)
    if strategy == "nucleus":
        selected = _nucleus(probs, top_p)
        return selected, _renormalised(probs, selected)
    if strategy == "top1":
        chosen = probs.argmax(dim=-1, keepdim=True)
    elif strategy == "sample":
        chosen = _multinomial(probs, generator)
    elif strategy == "topk":
        chosen = probs.topk(top_k, dim=-1).indices
    else:
        raise BadInput(f"sample.strategy={strategy!r} is not one of {STRATEGIES}")
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
    if strategy == "topk":
        weights = torch.where(selected, probs, torch.zeros_like(probs))
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        weights = selected.to(probs.dtype)
    return selected, weights


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of experts, most probable first (ties: lower index first), holding ``top_p`` of the mass.

    An expert is in the set when the experts ranked before it hold less than
    ``top_p``; so the first always is. ``top_p = 1``: every expert with a nonzero
    probability (a cumulative sum that rounds to just under 1 would otherwise
    depend on the order of the additions).
    """
    if top_p >= 1.0:
        return probs > 0
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    before = torch.cat([torch.zeros_like(ranked[:, :1]), ranked.cumsum(dim=-1)[:, :-1]], dim=1)
    keep = (before < top_p) & (ranked > 0)  # never an expert of zero probability (a sum rounded under top_p)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep)


def _renormalised(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The selected probabilities over their sum; a row that selects every expert keeps them as they are."""
    kept = torch.where(selected, probs, torch.zeros_like(probs))
    return torch.where(selected.all(dim=-1, keepdim=True), probs, kept / kept.sum(dim=-1, keepdim=True))


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row; drawn where the generator lives so seeds reproduce across devices.

    ``generator`` may also be one stream per row (``ddm.sampling.indexed.RowStreams``), which draws itself.
    """
    if hasattr(generator, "multinomial"):
        return generator.multinomial(probs)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)
