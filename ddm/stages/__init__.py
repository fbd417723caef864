"""One module per pipeline stage. Each exposes ``run(cfg) -> dict``.

Contract of a stage:
- it reads only the artefacts of earlier stages it needs (paths from
  ``ddm.artifacts.RunDir``) and writes its own atomically;
- it returns at once with the existing summary when its final artefact exists,
  unless ``cfg.redo`` is true;
- it logs one line with what it produced.
"""
from __future__ import annotations

import logging
import random
import resource
import time
from contextlib import contextmanager

import numpy as np
import torch

log = logging.getLogger("ddm")

# CLI name -> module under ddm.stages
STAGES = {
    "prepare": "prepare",
    "embed": "embed",
    "cluster": "cluster",
    "partition": "partition",
    "train-expert": "train_expert",
    "train-router": "train_router",
    "sample": "sample",
    "report": "report",
    "pipeline": "pipeline",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_rss_gib() -> float:
    """Peak resident memory of this process and its finished children, in GiB."""
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kib, child_kib) / 2**20


@contextmanager
def timed(name: str, sink: dict | None = None):
    """Measure a block's wall time (and the process's peak memory after it)."""
    start = time.perf_counter()
    yield
    wall = time.perf_counter() - start
    if sink is not None:
        sink[name] = dict(wall_s=round(wall, 2), peak_rss_gib=round(peak_rss_gib(), 3))


def skip(marker, cfg) -> bool:
    """True when a stage's final artefact exists and no redo was asked for."""
    return marker.exists() and not cfg.get("redo", False)
