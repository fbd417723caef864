"""``paper.cfg_scales``: the guidance scales of the sweep at the largest budget, checked before any training."""

from __future__ import annotations

import math

from ddm.errors import BadInput
from ddm.settings import Settings


def cfg_scales(cfg: Settings, classes: int) -> tuple[tuple[float, ...], str | None]:
    """The sweep's scales, sorted, with the table's own ``sample.cfg_scale`` among them; and a note when skipped.

    ``()`` when ``paper.cfg_scales`` is absent or empty, or when the data has no class
    labels (nothing to guide by: the note says so). A scale must be a finite number >= 0
    (0: the unconditional model, 1: no guidance).
    """
    raw = cfg.paper.get("cfg_scales") or []  # cfg.paper: a plain mapping
    if not raw:
        return (), None
    scales = []
    for s in raw:
        try:
            value = float(s)
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and value >= 0) or isinstance(s, bool):
            raise BadInput(f"paper.cfg_scales: {s!r} is not a guidance scale (a finite number >= 0, 1 = no guidance)")
        scales.append(value)
    if len(set(scales)) != len(scales):
        raise BadInput(f"paper.cfg_scales={list(raw)} lists a scale twice")
    if classes == 0 and str(cfg.text.kind) == "none":
        return (), "the data has no class labels (no guidance): the guidance sweep is skipped"
    return tuple(sorted({*scales, float(cfg.sample.cfg_scale)})), None
