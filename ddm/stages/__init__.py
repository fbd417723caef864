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
    "evaluate": "evaluate",
    "report": "report",
    "pipeline": "pipeline",
    "submit": "submit",
    "status": "status",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset this process's high-water mark (Linux: writing 5 to clear_refs), so the next reading is per stage."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last reset, or since it started, in GiB."""
    hwm = _status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm / 2**20


def children_peak_rss_gib() -> float:
    """Largest peak of any finished child process (data-loader workers), in GiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


@contextmanager
def timed(name: str, sink: dict):
    """Record a block's wall time and peak memory (this process and its loader workers) in ``sink``.

    Nothing is recorded when the stage only found its results already there.
    """
    global _skipped
    _skipped = False
    reset_peak_rss()
    start = time.perf_counter()
    yield
    if _skipped:
        return
    sink[name] = dict(wall_s=round(time.perf_counter() - start, 2), peak_rss_gib=round(peak_rss_gib(), 3),
                      workers_peak_rss_gib=round(children_peak_rss_gib(), 3))


_skipped = False


def note_skipped() -> None:
    """A stage calls this when it returns existing results, so its earlier timing is kept."""
    global _skipped
    _skipped = True


def skip(marker, cfg) -> bool:
    """True when a stage's final artefact exists and no redo was asked for."""
    done = marker.exists() and not cfg.get("redo", False)
    if done:
        note_skipped()
    return done
