"""Training progress: a progress bar on a terminal, one log line every few steps anywhere else.

A progress bar redraws itself with carriage returns; written to a file (a SLURM
log, a pipe) that becomes one endless line of repeated, half-overwritten
updates. So the bar is shown only when stderr is a terminal, and otherwise
``StepLog`` writes ``<job>: step 40/200, loss 0.4312, 23.5 steps/s`` through the
``ddm`` logger every ``log_every`` optimizer steps.
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import Callback, TQDMProgressBar

log = logging.getLogger("ddm")


class StepLog(Callback):
    """Logs step, loss and speed every ``every`` optimizer steps, on global rank 0 only."""

    def __init__(self, job: str, every: int, metric: str = "train/loss"):
        self.job, self.every, self.metric = job, max(1, int(every)), metric
        self._step = 0
        self._time = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed job counts its speed from the step it resumed at.
        self._step, self._time = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Mid gradient accumulation the step has not advanced: nothing new to say.
        if step == self._step or step % self.every or not trainer.is_global_zero:
            return
        now = time.monotonic()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        loss = trainer.callback_metrics.get(self.metric)
        shown = f"{float(loss):.4f}" if loss is not None else "n/a"
        log.info("%s: step %d/%d, loss %s, %.1f steps/s", self.job, step, trainer.max_steps, shown, rate)


def interactive() -> bool:
    """True when stderr, where a progress bar draws, is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_callbacks(job: str, log_every: int) -> list[Callback]:
    """The progress bar on a terminal; otherwise a ``StepLog`` (build the Trainer with the bar disabled)."""
    if interactive():
        return [TQDMProgressBar(refresh_rate=10)]
    return [StepLog(job, log_every)]
