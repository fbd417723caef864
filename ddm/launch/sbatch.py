"""Rendering the sbatch scripts of a run, and sending them: one array job for the experts, one job for the
router; for a stage in parts (``ddm.launch.stage_parts``: prepare, embed, partition, encode, sample), one array job for
its parts and one job that merges them.

The resources come from the island's ``slurm:`` block plus its shape
(``devices`` tasks per node, ``num_nodes`` nodes, ``gpu:<devices>`` on a GPU
island); a stage's job is one process: one task on one node with the block's
cores, and the island's GPU request where the stage uses a GPU (embed, encode;
a merge never does). Each script ``exec``s the job's command, so the training process
itself (or ``srun``, which forwards it to every rank) receives the SIGUSR1
that ``--signal`` sends before the time limit, and the SIGTERM of ``scancel``
(a stage's jobs keep no checkpoint, and are not sent the SIGUSR1).
The interpreter is the one running ``ddm submit`` (``sys.executable``), not
whatever ``python`` a job's PATH holds.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ddm.errors import BadInput
from ddm.io import write_text
from ddm.launch import naming, slurm
from ddm.settings import Island

if TYPE_CHECKING:
    from ddm.launch.stage_spec import StageParts

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
    devices, nodes = int(island.devices), int(island.num_nodes)
    return [f"--nodes={nodes}", f"--ntasks-per-node={devices}", *_block_options(island.slurm, _gpus(island))]


def _gpus(island: Island) -> str | None:
    """The island's GPU request: ``island.slurm.gres``, or ``gpu:<devices>`` on a GPU island; None on CPUs."""
    gres = island.slurm.gres
    if gres is None and str(island.accelerator).lower() in GPU_ACCELERATORS:
        gres = f"gpu:{int(island.devices)}"
    return gres


def stage_resource_options(island: Island, gpu: bool) -> list[str]:
    """sbatch options for one job of a stage: one task on one node with ``island.slurm``'s cores, memory,
    partition, time, account and extra options; ``gpu``: with the island's GPU request, as an expert's
    (embed and encode run on one device: give them an island of one GPU), else none (it decodes and
    writes images on CPUs)."""
    return ["--nodes=1", "--ntasks-per-node=1", *_block_options(island.slurm, _gpus(island) if gpu else None)]


def _block_options(block, gres) -> list[str]:
    opts = []
    for flag, value in (
        ("--partition", block.partition),
        ("--time", block.time),
        ("--cpus-per-task", block.cpus_per_task),
        ("--mem", block.mem),
        ("--gres", gres),
        ("--account", block.account),
    ):
        if value not in (None, ""):
            opts.append(f"{flag}={_directive_value(value)}")
    return opts + [str(o) for o in block.extra]


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
        "# exec: the job's process (or srun, which forwards signals to every rank) receives SLURM's",
        "# signals (SIGUSR1 before the time limit, where asked; SIGTERM on scancel), not an intermediate shell.",
        " \\\n    ".join(["exec " + " ".join(launcher + program), *args]),
        "",
    ]
    return "\n".join(lines)


def _common_options(name: str, run_dir, signal_before_s: int | None, cwd: Path) -> list[str]:
    """``signal_before_s``: None for a job that keeps no checkpoint to save before its time limit."""
    return [
        f"--job-name={_directive_value(name)}",
        f"--comment={_directive_value(naming.run_comment(run_dir))}",  # which run directory this job serves
        "--requeue",  # preempted or failed nodes: back to the queue
        *([] if signal_before_s is None else [f"--signal=B:USR1@{int(signal_before_s)}"]),  # checkpoint, requeue
        "--open-mode=append",  # a requeued job continues its own log
        f"--chdir={_directive_value(cwd)}",
    ]


def expert_array_script(
    run_dir, expert_ids, overrides: list[str], island: Island, python: str | None = None, cwd=None, where=None
) -> str:
    """The sbatch script of one array job: task ``i`` trains expert ``i`` of the run.

    ``overrides`` are the jobs' Hydra overrides (``ddm.launch.overrides.job_overrides``).
    The log of task ``i`` is ``experts/expert-<ii>/slurm-<array job>_<i>.out``; that folder must exist.
    ``where``: the run as its jobs are given it and the job's comment names it, when that is not ``run_dir`` (a
    run in a bucket: its URL; ``run_dir`` is then its working copy here, where the logs go).
    """
    run_dir = Path(run_dir).resolve()
    slurm = island.slurm
    out = run_dir / "experts" / "expert-%2a" / "slurm-%A_%a.out"  # %2a: zero-padded like expert-03
    options = [
        *_common_options(
            naming.run_job_name(where or run_dir, naming.EXPERT),
            where or run_dir,
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
        f"Expert array of the run {where or run_dir}, written by `ddm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "Array task i trains expert i; `ddm status` shows where each one stands.",
        "To rerun some tasks by hand: sbatch --array=<ids> <this file>",
    ]
    return _render(header, options, slurm.setup, prelude, program, args, tasks_per_job(island) > 1)


def router_script(
    run_dir, overrides: list[str], island: Island, python: str | None = None, cwd=None, where=None
) -> str:
    """The sbatch script of the router job; its log is ``router/slurm-<job id>.out``; ``where`` as for
    ``expert_array_script``."""
    run_dir = Path(run_dir).resolve()
    slurm = island.slurm
    out = run_dir / "router" / "slurm-%j.out"
    options = [
        *_common_options(
            naming.run_job_name(where or run_dir, naming.ROUTER),
            where or run_dir,
            slurm.signal_before_s,
            Path(cwd or Path.cwd()).resolve(),
        ),
        f"--output={_directive_value(out)}",
        *resource_options(island),
    ]
    program = [shlex.quote(python or sys.executable), "-m", "ddm", "train-router"]
    args = [f'"hydra.run.dir={_dq(run_dir)}/router/hydra/slurm-$SLURM_JOB_ID"', *[shlex.quote(o) for o in overrides]]
    header = [
        f"Router job of the run {where or run_dir}, written by `ddm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "It needs no expert, so it runs beside them.",
    ]
    return _render(header, options, slurm.setup, [], program, args, tasks_per_job(island) > 1)


def parts_script(spec: StageParts, run_dir, ids, overrides: list[str], island: Island, python=None, cwd=None) -> str:
    """The sbatch script of one array job: task ``j`` runs ``ddm <stage> <spec.part_key>=j``.

    ``ids``: the parts (clusters) to run, which become the array's indices; ``overrides`` (the user's, with the
    number of parts) as ``ddm.launch.overrides.job_overrides`` gives them. The log of task ``j`` is
    ``logs/<stage>/<task>/slurm-<array job>_<j>.out`` (``spec.task_job(j)``); that folder must exist.
    """
    run_dir = Path(run_dir).resolve()
    logs = naming.stage_logs(run_dir, spec.stage)
    # SLURM pads %Na to N digits: the folder spec.task_job names
    out = logs / f"{spec.task_prefix}%{spec.task_digits}a" / "slurm-%A_%a.out"
    options = [
        *_common_options(naming.run_job_name(run_dir, spec.array_job), run_dir, None, _cwd(cwd)),
        f"--array={format_array(ids)}",
        f"--output={_directive_value(out)}",
        *stage_resource_options(island, spec.gpu),
    ]
    prelude = [
        f"printf -v PART '%0{spec.task_digits}d' \"$SLURM_ARRAY_TASK_ID\"",
        f"PART_DIR={shlex.quote(str(logs))}/{spec.task_prefix}$PART",
    ]
    program = [shlex.quote(python or sys.executable), "-m", "ddm", spec.stage]
    args = [
        f'"{spec.part_key}=$SLURM_ARRAY_TASK_ID"',
        '"hydra.run.dir=$PART_DIR/hydra/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        *[shlex.quote(o) for o in overrides],
    ]
    header = [
        f"The {spec.stage} stage of the run {run_dir} in parts, written by `ddm submit submit.stage={spec.stage}` "
        f"on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        f"Array task j {spec.what}.",
        *(["A job that depends on this array merges the parts."] if spec.merge else []),
        "To rerun some tasks by hand: sbatch --array=<ids> <this file>",
    ]
    return _render(header, options, island.slurm.setup, prelude, program, args, False)


def final_script(spec: StageParts, run_dir, job: str, overrides: list[str], island: Island, python=None, cwd=None):
    """The sbatch script of the job that completes a stage: ``job`` is ``merge`` (of the parts written by their
    own jobs, on CPUs) or the stage (one part: all of it, on the parts' resources). Its log is
    ``logs/<stage>/<job>/slurm-<id>.out``."""
    run_dir = Path(run_dir).resolve()
    folder = naming.stage_logs(run_dir, spec.stage) / job
    options = [
        *_common_options(naming.run_job_name(run_dir, spec.final_name), run_dir, None, _cwd(cwd)),
        f"--output={_directive_value(folder / 'slurm-%j.out')}",
        *stage_resource_options(island, spec.gpu and job == spec.stage),
    ]
    program = [shlex.quote(python or sys.executable), "-m", "ddm", spec.stage]
    args = [f'"hydra.run.dir={_dq(folder)}/hydra/slurm-$SLURM_JOB_ID"', *[shlex.quote(o) for o in overrides]]
    what = "Runs all of" if job == spec.stage else "Merges the parts of"
    header = [
        f"{what} the {spec.stage} stage of the run {run_dir}; written by `ddm submit submit.stage={spec.stage}` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.",
    ]
    return _render(header, options, island.slurm.setup, [], program, args, False)


def _cwd(cwd) -> Path:
    return Path(cwd or Path.cwd()).resolve()


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


def send(script: str, path: Path, dry_run: bool, folders=(), extra_args: list[str] = ()) -> str | None:
    """Write the script beside the run and sbatch it (``extra_args`` before its name: a dependency);
    with ``dry_run`` only print both. Returns the job id."""
    command = shlex.join(["sbatch", "--parsable", *extra_args, str(path)])
    if dry_run:
        print(f"# --- {path} (dry run: not written, not submitted)\n{script}")
        print(f"# would run: {command}\n")
        return None
    for folder in folders:  # SLURM opens each job's log there and does not create folders
        Path(folder).mkdir(parents=True, exist_ok=True)
    write_text(path, script)
    return slurm.sbatch(path, list(extra_args))
