"""Thin wrappers around the SLURM commands ``ddm`` calls, with their output parsed.

Every function reads the cluster through the ordinary client commands (so
``SLURM_CONF`` and the user's environment apply) and never needs accounting
(``sacct``): many small clusters run without ``slurmdbd``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ddm.errors import UserError

# squeue's fields: job id (12_3 for an array task), array task id ("N/A" outside arrays),
# state, name, comment. The comment is last because it is free text that may hold the separator.
_FIELDS = "%i|%K|%T|%j|%k"
# A job in any of these states occupies a node, or is about to.
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"})

NOT_AVAILABLE = (
    "SLURM is not available here (no `sbatch` on PATH). Run the jobs on this machine instead: "
    "`ddm submit submit.launcher=local` (submit.parallel=N at a time), "
    "`ddm train-expert expert.id=<k>` for each expert and `ddm train-router`, or `ddm pipeline` for all stages."
)


class SlurmError(UserError, RuntimeError):
    """A SLURM command failed or SLURM is not installed; its message says what the command said."""


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue -r``: a job, or one task of an array job."""

    job_id: str  # "12" or "12_3"
    task_id: int | None  # the array task id (= expert id for an expert array), None outside arrays
    state: str  # PENDING, RUNNING, REQUEUED, ...
    name: str
    comment: str

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


def available() -> bool:
    """True when the SLURM client commands are on PATH."""
    return all(shutil.which(cmd) for cmd in ("sbatch", "squeue"))


def _run(cmd: list[str], timeout: float = 60) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(NOT_AVAILABLE)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f}s (is slurmctld up?)") from e
    if out.returncode != 0:
        # SLURM clients print a chain of errors; the last line says what finally went wrong.
        lines = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()
        raise SlurmError(f"`{cmd[0]}` failed ({out.returncode}): {lines[-1].strip()}")
    return out.stdout


def parse_queue(text: str) -> list[QueuedJob]:
    """Parse ``squeue -h -r -o '%i|%K|%T|%j|%k'`` output."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        job_id, task, state, name, comment = line.split("|", 4)
        jobs.append(
            QueuedJob(
                job_id=job_id.strip(),
                task_id=int(task) if task.strip().isdigit() else None,
                state=state.strip(),
                name=name.strip(),
                comment=comment.strip(),
            )
        )
    return jobs


def queue(names: list[str]) -> list[QueuedJob]:
    """Every job (each array task on its own) with one of these names that SLURM still lists:
    pending, running, requeued or completing."""
    if not names:
        return []
    # -r: one line per array task, so a pending array "0-3" shows as four ids we can compare.
    return parse_queue(_run(["squeue", "-h", "-r", f"--name={','.join(names)}", "-o", _FIELDS]))


def sbatch(script: str | Path, extra_args: list[str] | None = None) -> str:
    """Submit a batch script; return its job id."""
    out = _run(["sbatch", "--parsable", *(extra_args or []), str(script)])
    # --parsable prints "<id>" or "<id>;<cluster>"
    return out.strip().split(";")[0]


def scancel(job_id: str, signal: str | None = None) -> None:
    """Cancel a job (or array task ``12_3``), or send it a signal."""
    _run(["scancel", *([f"--signal={signal}"] if signal else []), str(job_id)])


def job_state(job_id: str) -> str | None:
    """The state SLURM's controller holds for a job, also a finished one (until ``MinJobAge`` passes).

    None when the controller no longer knows the job (it ended a while ago); a ``SlurmError`` when
    the controller cannot be asked, so a caller never takes "cannot tell" for "ended". Needs no accounting.
    """
    try:
        text = _run(["scontrol", "-o", "show", "job", str(job_id)])
    except SlurmError as e:
        if "invalid job id" in str(e).lower():
            return None
        raise
    for field in text.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def run_jobs(run_dir: str | Path) -> tuple[dict[int, QueuedJob], QueuedJob | None]:
    """The queued or running jobs of one run: ``({expert id: job}, router job or None)``.

    Expert jobs are array tasks whose task id is the expert id. When a run has
    two entries for one job (a duplicate submitted by hand), the running one wins.
    """
    from ddm.launch import naming

    return array_and_job(run_dir, naming.EXPERT, naming.ROUTER)


def array_and_job(run_dir, array: str, single: str | None) -> tuple[dict[int, QueuedJob], QueuedJob | None]:
    """The run's tasks of its array job ``array`` by task id, and its job ``single`` (None: no such job); running
    entries win. The jobs of a stage's parts (``ddm.launch.stage_parts``): ``prepare-parts`` and ``prepare``, ..."""
    from ddm.launch import naming

    array_name = naming.run_job_name(run_dir, array)
    single_name = naming.run_job_name(run_dir, single) if single else None
    tasks: dict[int, QueuedJob] = {}
    job = None
    for entry in queue([array_name, *([single_name] if single_name else [])]):
        if not naming.belongs_to(entry.comment, run_dir):
            continue
        if entry.name == array_name and entry.task_id is not None:
            if entry.task_id not in tasks or entry.running:
                tasks[entry.task_id] = entry
        elif entry.name == single_name and (job is None or entry.running):
            job = entry
    return tasks, job
