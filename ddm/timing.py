"""Wall time and peak memory of one stage, read from the operating system."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager


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
def measured(out: dict):
    """Fill ``out`` with the block's wall time and peak memory (this process and its loader workers)."""
    reset_peak_rss()
    start = time.perf_counter()
    yield out
    out.update(
        wall_s=round(time.perf_counter() - start, 2),
        peak_rss_gib=round(peak_rss_gib(), 3),
        workers_peak_rss_gib=round(children_peak_rss_gib(), 3),
    )
