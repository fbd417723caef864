"""``failed.json``: what a training job leaves when it raised, for ``ddm status`` and for people.

Written atomically beside the job's checkpoints when training (or exporting)
raises an exception; removed once a later attempt writes its ``record.json``.
A signal (preemption, time limit) is not a failure and writes nothing here.

Fields: ``job`` (expert-KK or router), ``error_type``, ``message``, ``step``
(the trainer's global step when it raised, or null before training started;
for a diverged loss, the step whose loss was not finite),
``time`` (ISO 8601, UTC), ``traceback`` (its last lines), ``slurm_job_id``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import traceback
from pathlib import Path

from ddm.io import write_json

log = logging.getLogger("ddm")

FAILED_NAME = "failed.json"


def failure_path(job_dir: Path) -> Path:
    return Path(job_dir) / FAILED_NAME


def write_failure(job_dir: Path, job: str, exc: BaseException, step: int | None) -> Path:
    """Record ``exc`` in ``job_dir/failed.json`` and return its path."""
    path = failure_path(job_dir)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_json(
        path,
        dict(
            job=job,
            error_type=type(exc).__name__,
            message=str(exc),
            step=step,
            time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            traceback=tb[-4000:],
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        ),
    )
    log.error("%s failed at step %s with %s: %s (recorded in %s)", job, step, type(exc).__name__, exc, path)
    return path


def clear_failure(job_dir: Path) -> None:
    """Remove a ``failed.json`` of an earlier attempt: this one succeeded."""
    failure_path(job_dir).unlink(missing_ok=True)


class FailureRecord:
    """Context manager: an ``Exception`` raised inside writes ``failed.json``, then propagates.

    Set ``trainer`` once it exists so the record names the step. Signals and
    interrupts (``SystemExit``, ``KeyboardInterrupt``) are not failures.
    Only global rank 0 writes.
    """

    def __init__(self, job_dir: Path, job: str):
        self.job_dir, self.job = Path(job_dir), job
        self.trainer = None

    def __enter__(self) -> FailureRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        step = int(self.trainer.global_step) if self.trainer is not None else None
        # the loss is checked every few steps: the step it diverged at is earlier than the trainer's
        step = getattr(exc, "step", None) if getattr(exc, "step", None) is not None else step
        if self._is_global_zero():
            try:
                write_failure(self.job_dir, self.job, exc, step)
            except OSError as write_error:  # never hide the real error behind this one
                log.error("could not write %s: %s", failure_path(self.job_dir), write_error)
        return False

    def _is_global_zero(self) -> bool:
        if self.trainer is not None:
            return bool(self.trainer.is_global_zero)
        from lightning.fabric.utilities.rank_zero import rank_zero_only  # rank from the launcher's env

        return getattr(rank_zero_only, "rank", 0) == 0
