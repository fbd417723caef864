"""How the local launcher divides one machine among the jobs it runs at once.

A GPU island (``island.accelerator`` gpu, cuda, or auto with GPUs visible)
gives each job ``island.devices`` GPUs of its own through
``CUDA_VISIBLE_DEVICES``, so N jobs at a time need N x devices GPUs. A CPU
island divides the cores: each of N jobs gets ``island.threads = cores // (N x
devices)``, so together they never ask for more threads than there are cores
(more would make every job slower).

``auto`` (or null) runs as many jobs at a time as there are jobs, up to what
the machine holds: one per ``island.devices`` visible GPUs, or one per core
(per ``island.devices`` cores) on a CPU island. Jobs side by side beat one job
at a time with all the threads on CPUs: the small demo experts gain little
from more intra-op threads, and threads that wait for each other lose most
when the cores are shared (the figures in docs/islands.md: two demo experts side by
side at one thread each, against one after another at two). Nothing here
imports torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ddm.errors import BadInput
from ddm.settings import Island

log = logging.getLogger("ddm")

GPU_ACCELERATORS = ("gpu", "cuda")
AUTO = "auto"


@dataclass(frozen=True)
class Plan:
    """N slots, one per job running at a time; a queued job starts in the first slot that frees."""

    parallel: int
    slot_env: tuple[dict, ...]  # per slot: the environment variables its job gets (its GPUs, its threads)
    threads: int | None  # island.threads for every job on a CPU island; None: the island's own
    gpus_per_job: int  # 0 on a CPU island

    def describe(self) -> str:
        if self.gpus_per_job:
            gpus = "; ".join(e["CUDA_VISIBLE_DEVICES"] for e in self.slot_env)
            return f"{self.parallel} at a time, {self.gpus_per_job} GPU(s) each (CUDA_VISIBLE_DEVICES {gpus})"
        return f"{self.parallel} at a time, {self.threads} thread(s) each"


def check_parallel(value, key: str) -> int | None:
    """``value`` as a number of jobs at a time (None for ``auto``/null: as the machine holds); else a clear error."""
    if value is None or str(value).strip().lower() == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not str(value).strip().isdigit():
        raise BadInput(f"{key}={value!r}: give the number of jobs to run at a time (1, 2, ...) or auto")
    number = int(value)
    if number < 1:
        raise BadInput(f"{key}={number}: at least one job must run at a time; use {key}=1 to run them one by one")
    return number


def uses_gpus(island: Island, gpus: list[str] | None) -> bool:
    accelerator = str(island.accelerator).lower()
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and bool(gpus))


def _devices_per_job(island: Island) -> int:
    devices = island.devices
    if isinstance(devices, bool) or not str(devices).isdigit() or int(devices) < 1:
        raise BadInput(
            f"island.devices={devices!r}: jobs started on this machine are each given their own devices, "
            f"so the island must name how many one job uses (island.devices=1, 2, ...)"
        )
    return int(devices)


def plan(parallel, island: Island, key: str, gpus: list[str] | None, cores: int, jobs: int | None = None) -> Plan:
    """The slots for ``parallel`` jobs (``key`` names the option in errors) on a machine with ``gpus`` and ``cores``.

    ``gpus``: the visible GPUs' names (``ddm.devices.visible_gpus``); only read for a GPU island.
    ``jobs``: how many jobs there are to run; ``auto`` starts no more at a time.
    """
    wanted = max(1, jobs) if jobs is not None else None
    parallel = check_parallel(parallel, key)
    if int(island.num_nodes) != 1:
        raise BadInput(
            f"island.num_nodes={island.num_nodes}: the local launcher ({key}) runs jobs on this machine "
            f"only; submit a multi-node island to SLURM (submit.launcher=slurm)"
        )
    per_job = _devices_per_job(island)
    if uses_gpus(island, gpus):
        gpus = list(gpus or [])
        fits = len(gpus) // per_job
        if fits == 0:
            raise BadInput(
                f"island.devices={per_job} GPU(s) per job but {len(gpus)} visible here "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): choose an island "
                f"that fits this machine, e.g. island=local_cpu or island.devices={max(len(gpus), 1)}"
            )
        parallel = min(fits, wanted or fits) if parallel is None else parallel
        if parallel > fits:
            raise BadInput(
                f"{key}={parallel} jobs of {per_job} GPU(s) each need {parallel * per_job} GPUs; {len(gpus)} are "
                f"visible here, so at most {key}={fits}"
            )
        threads = max(1, cores // (parallel * per_job))
        slot_env = tuple(
            dict(CUDA_VISIBLE_DEVICES=",".join(gpus[i * per_job : (i + 1) * per_job]), OMP_NUM_THREADS=str(threads))
            for i in range(parallel)
        )
        return Plan(parallel, slot_env, None, per_job)
    if parallel is None:
        fits = max(1, cores // per_job)
        parallel = min(fits, wanted or fits)
    processes = parallel * per_job
    if processes > cores:
        log.warning(
            "%s=%d: %d training processes on %d core(s); each gets one thread and they share the cores",
            key,
            parallel,
            processes,
            cores,
        )
    threads = max(1, cores // processes)
    return Plan(parallel, tuple(dict(OMP_NUM_THREADS=str(threads)) for _ in range(parallel)), threads, 0)
