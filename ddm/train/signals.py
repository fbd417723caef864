"""Preemption: turning SIGUSR1 / SIGTERM into "checkpoint, then requeue or stop".

SLURM warns a job before its time limit (``sbatch --signal=B:USR1@<s>``) and
sends SIGTERM on preemption or cancellation. Dying inside a step would lose
everything since the last periodic checkpoint, so the handler only sets a
flag; the checkpoint callback sees it at the next batch end, saves
``last.ckpt`` and stops the trainer. Then:

- SIGUSR1 (the time-limit warning): the stage requeues the SLURM job
  (``scontrol requeue``), which resumes from ``last.ckpt``;
- SIGTERM: the process exits with 128 + 15 and does *not* requeue. ``scancel``
  sends SIGTERM, and a cancelled job must stay cancelled; a preempted job with
  ``--requeue`` is put back in the queue by SLURM itself.

Lightning's own SLURM handling (SIGUSR1 -> ``hpc_ckpt_*.ckpt`` + requeue) is
switched off where the trainer is built, so exactly one mechanism acts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger("ddm")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised by a stage that stopped on a signal: ``code`` 0 when the job was requeued."""


class PreemptionGuard:
    """Context manager: while active, SIGUSR1 and SIGTERM set ``requested`` instead of killing.

    ``install()`` may be called again (the checkpoint callback does, at train
    start) to take the signals back from handlers Lightning installed meanwhile.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def _handle(self, signum, frame) -> None:
        # Only a flag: the process may be in the middle of a step or a checkpoint write.
        if self.signum is None:
            log.warning(
                "received %s: will save a checkpoint at the end of the current step and stop",
                signal.Signals(signum).name,
            )
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True when it succeeded."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("could not run `scontrol requeue %s`: %s", job_id, exc)
        return False
    if result.returncode != 0:
        log.error(
            "`scontrol requeue %s` failed (exit %d): %s",
            job_id,
            result.returncode,
            (result.stderr or result.stdout).strip(),
        )
        return False
    return True


def stop_after_preemption(
    guard: PreemptionGuard, what: str, step: int, requeue: bool, is_global_zero: bool = True
) -> Preempted:
    """What a stage raises after a signal stopped training at ``step`` (``last.ckpt`` already saved).

    Under SLURM with ``requeue`` on, rank 0 requeues the job and the process
    exits with 0; the requeued job resumes from ``last.ckpt``. Otherwise the exit
    status is 128 + the signal number, as if the signal had ended the process.
    """
    job_id = slurm_job_id()
    if requeue and job_id and guard.signum == signal.SIGUSR1:
        if not is_global_zero:
            return Preempted(0)
        if requeue_slurm_job(job_id):
            log.warning(
                "%s: %s at step %d; checkpoint saved, SLURM job %s requeued: it will resume from last.ckpt",
                what,
                guard.signal_name,
                step,
                job_id,
            )
            return Preempted(0)
        log.error(
            "%s: %s at step %d; checkpoint saved but the requeue failed: resubmit the job to resume",
            what,
            guard.signal_name,
            step,
        )
        return Preempted(128 + int(guard.signum))
    if not job_id:
        why = "not running under SLURM (no SLURM_JOB_ID)"
    elif guard.signum != signal.SIGUSR1:
        why = f"{guard.signal_name} means cancel (scancel) or preemption, which SLURM requeues itself"
    else:
        why = "requeue is off"
    code = 128 + int(guard.signum)
    log.warning(
        "%s: %s at step %d; checkpoint saved, exiting with status %d since %s: run the same command again to resume",
        what,
        guard.signal_name,
        step,
        code,
        why,
    )
    return Preempted(code)
