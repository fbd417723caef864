"""The CPU cores a job may use: what worker pools and the local launcher size themselves by (no torch here)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, cgroups, SLURM's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
