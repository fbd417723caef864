"""Which process of a job this is, read from the environment before any process group exists.

Plain Python (no torch, no Lightning): the data layer asks it too (``ddm.data.verified``), and a
stage that only prepares data must not import the training stack to ask.
"""

from __future__ import annotations

import os

from ddm.settings import Island

# Every launcher's name for a process's rank; a job's global rank 0 has none of them above 0.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")


def is_global_rank_zero(env=None) -> bool:
    """True in the process that speaks for a job: global rank 0, or a job of one process.

    Read from the environment, before any process group exists: Lightning starts ranks 1..n-1 with
    ``LOCAL_RANK`` set, srun gives every rank ``SLURM_PROCID``, torchrun ``RANK``.
    """
    env = os.environ if env is None else env
    for name in RANK_VARIABLES:
        try:
            if int(env.get(name) or 0) != 0:
                return False
        except ValueError:
            continue  # not a rank this launcher set
    return True


def island_processes(island: Island) -> int | None:
    """How many processes one job of ``island`` runs (devices x nodes), or None where the config leaves it
    to Lightning (``devices: auto`` or a list of device ids)."""
    devices, nodes = island.devices, island.num_nodes or 1
    if isinstance(devices, bool) or not isinstance(devices, int) or not isinstance(nodes, int):
        return None
    return devices * nodes
