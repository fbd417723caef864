"""Rendering the sbatch scripts of a run: one array job for the experts, one job for the router.

The resources come from the island's ``slurm:`` block plus its shape
(``devices`` tasks per node, ``num_nodes`` nodes, ``gpu:<devices>`` on a GPU
island). Each script ``exec``s the training command, so the training process
itself (or ``srun``, which forwards it to every rank) receives the SIGUSR1
that ``--signal`` sends before the time limit, and the SIGTERM of ``scancel``.
The interpreter is the one running ``ddm submit`` (``sys.executable``), not
whatever ``python`` a job's PATH holds.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ddm.errors import BadInput
from ddm.launch import naming
from ddm.settings import Island

GPU_ACCELERATORS = ("gpu", "cuda")


def format_array(ids) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: an ``--array`` spec holding exactly these ids."""
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise BadInput("an array job needs at least one index")
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _directive_value(value) -> str:
    """sbatch reads ``#SBATCH`` values up to whitespace unless they are double-quoted."""
    value = str(value)
    return f'"{value}"' if any(c.isspace() for c in value) else value


def resource_options(island: Island) -> list[str]:
    """sbatch options for one job of this island: its shape from the island, the rest from ``island.slurm``."""
    slurm = island.slurm
    devices, nodes = int(island.devices), int(island.num_nodes)
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={devices}"]
    gres = slurm.gres
    if gres is None and str(island.accelerator).lower() in GPU_ACCELERATORS:
        gres = f"gpu:{devices}"
    for flag, value in (
        ("--partition", slurm.partition),
        ("--time", slurm.time),
        ("--cpus-per-task", slurm.cpus_per_task),
        ("--mem", slurm.mem),
        ("--gres", gres),
        ("--account", slurm.account),
    ):
        if value not in (None, ""):
            opts.append(f"{flag}={_directive_value(value)}")
    opts += [str(o) for o in slurm.extra]
    return opts


def tasks_per_job(island: Island) -> int:
    return int(island.devices) * int(island.num_nodes)


def _render(
    header: list[str],
    options: list[str],
    setup: list[str],
    prelude: list[str],
    program: list[str],
    args: list[str],
    multi_task: bool,
) -> str:
    lines = ["#!/bin/bash", *[f"# {h}" if h else "#" for h in header]]
    lines += [f"#SBATCH {o}" for o in options]
    lines += [
        "",
        "set -euo pipefail",
        "# One torch thread pool per task, sized to the task's cores: no oversubscription.",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "export PYTHONUNBUFFERED=1",
        *prelude,
    ]
    if setup:
        lines += ["", "# island.slurm.setup", *[str(s) for s in setup]]
    launcher = ["srun", "--kill-on-bad-exit=1"] if multi_task else []
    lines += [
        "",
        "# exec: the training process (or srun, which forwards signals to every rank) receives",
        "# SIGUSR1 before the time limit and SIGTERM on scancel, not an intermediate shell.",
        " \\\n    ".join(["exec " + " ".join(launcher + program), *args]),
        "",
    ]
    return "\n".join(lines)


def _common_options(name: str, run_dir: Path, signal_before_s: int, cwd: Path) -> list[str]:
    return [
        f"--job-name={_directive_value(name)}",
        f"--comment={_directive_value(naming.run_comment(run_dir))}",  # which run directory this job serves
        "--requeue",  # preempted or failed nodes: back to the queue
        f"--signal=B:USR1@{int(signal_before_s)}",  # time to checkpoint and requeue before the limit
        "--open-mode=append",  # a requeued job continues its own log
        f"--chdir={_directive_value(cwd)}",
    ]


def expert_array_script(
    run_dir, expert_ids, overrides: list[str], island: Island, python: str | None = None, cwd=None
) -> str:
    """The sbatch script of one array job: task ``i`` trains expert ``i`` of the run.

    ``overrides`` are the jobs' Hydra overrides (``ddm.launch.overrides.job_overrides``).
    The log of task ``i`` is ``experts/expert-<ii>/slurm-<array job>_<i>.out``; that folder must exist.
    """
    run_dir = Path(run_dir).resolve()
    slurm = island.slurm
    out = run_dir / "experts" / "expert-%2a" / "slurm-%A_%a.out"  # %2a: zero-padded like expert-03
    options = [
        *_common_options(
            naming.run_job_name(run_dir, naming.EXPERT),
            run_dir,
            slurm.signal_before_s,
            Path(cwd or Path.cwd()).resolve(),
        ),
        f"--array={format_array(expert_ids)}",
        f"--output={_directive_value(out)}",
        *resource_options(island),
    ]
    prelude = [
        "printf -v EXPERT '%02d' \"$SLURM_ARRAY_TASK_ID\"",
        f"EXPERT_DIR={shlex.quote(str(run_dir))}/experts/expert-$EXPERT",
    ]
    program = [shlex.quote(python or sys.executable), "-m", "ddm", "train-expert"]
    args = [
        '"expert.id=$SLURM_ARRAY_TASK_ID"',
        # each job keeps Hydra's own logs in its folder instead of one shared, timestamped one
        '"hydra.run.dir=$EXPERT_DIR/hydra/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        *[shlex.quote(o) for o in overrides],
    ]
    header = [
        f"Expert array of the run {run_dir}, written by `ddm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "Array task i trains expert i; `ddm status` shows where each one stands.",
        "To rerun some tasks by hand: sbatch --array=<ids> <this file>",
    ]
    return _render(header, options, slurm.setup, prelude, program, args, tasks_per_job(island) > 1)


def router_script(run_dir, overrides: list[str], island: Island, python: str | None = None, cwd=None) -> str:
    """The sbatch script of the router job; its log is ``router/slurm-<job id>.out``."""
    run_dir = Path(run_dir).resolve()
    slurm = island.slurm
    out = run_dir / "router" / "slurm-%j.out"
    options = [
        *_common_options(
            naming.run_job_name(run_dir, naming.ROUTER),
            run_dir,
            slurm.signal_before_s,
            Path(cwd or Path.cwd()).resolve(),
        ),
        f"--output={_directive_value(out)}",
        *resource_options(island),
    ]
    program = [shlex.quote(python or sys.executable), "-m", "ddm", "train-router"]
    args = [f'"hydra.run.dir={_dq(run_dir)}/router/hydra/slurm-$SLURM_JOB_ID"', *[shlex.quote(o) for o in overrides]]
    header = [
        f"Router job of the run {run_dir}, written by `ddm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "It needs no expert, so it runs beside them.",
    ]
    return _render(header, options, slurm.setup, [], program, args, tasks_per_job(island) > 1)


def _dq(text) -> str:
    """Escape text for use inside a double-quoted bash string."""
    return "".join("\\" + c if c in '"$`\\' else c for c in str(text))


def sbatch_script_path(run_dir, job: str) -> Path:
    """Where a rendered script is kept: ``<run>/slurm/<job>-<timestamp>.sbatch``, never reusing a name."""
    folder = Path(run_dir) / "slurm"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{job}-{stamp}.sbatch", 1
    while path.exists():
        n += 1
        path = folder / f"{job}-{stamp}-{n}.sbatch"
    return path
