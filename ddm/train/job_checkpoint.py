"""``JobCheckpoint``: a job's periodic checkpoints, its ``last.ckpt``, and stopping on a signal.

Two things a 10.8 GB DiT-XL/2 checkpoint on 8 ranks makes worth their code: ``last.ckpt`` is a hard
link to the step checkpoint of the same step rather than a second full write, and the ranks agree on
"did any of us get SIGUSR1/SIGTERM" (a collective and a host sync) only every few steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from ddm.train.checkpoint_io import fsync_dir, temp_name
from ddm.train.signals import PreemptionGuard

log = logging.getLogger("ddm")


class JobCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also keeps ``last.ckpt`` and stops training when a signal arrived.

    **One write per checkpoint.** When the step was just saved as ``step-*.ckpt``,
    ``last.ckpt`` becomes a hard link to that file (made under a temp name and
    renamed into place, so it is always a whole checkpoint) instead of a second
    full write: for a DiT-XL/2 that is about 10.8 GB less per checkpoint, and no
    rank waits for it. A hard link, not Lightning's symlink, so pruning old step
    files never leaves ``last.ckpt`` dangling. Where the filesystem has no hard
    links, or on a step with no step checkpoint (a signal), it is written in full.

    **A signal decision only where one is due.** Agreeing on "did any rank get a
    signal" is a collective and a host sync, so the ranks take it every
    ``decide_every`` optimizer steps (the NaN check's interval) and at every
    checkpoint step, not at every step; one process reads its own flag every step
    for free. The save happens at a batch end after an optimizer step, after the
    periodic checkpoint of that step (so a step is never saved twice), and
    ``should_stop`` lets Lightning finish the fit cleanly.
    """

    def __init__(self, *args, guard: PreemptionGuard | None = None, decide_every: int = 10, **kwargs):
        # No last-v1.ckpt beside a last.ckpt left by an earlier attempt: there is one last.ckpt.
        super().__init__(*args, enable_version_counter=False, **kwargs)
        if int(decide_every) < 1:
            raise ValueError(f"decide_every must be at least 1 step, got {decide_every}")
        self.guard = guard
        self.decide_every = int(decide_every)
        self._seen_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._seen_step = trainer.global_step
        if self.guard is not None:
            # Lightning installed its own SIGTERM handler just before training; take the signals back.
            self.guard.install()
            # With the signals ours, Lightning's received_sigterm never becomes true, yet under DDP its
            # epoch loop still broadcasts that flag from rank 0 and reads it back on every step (a
            # collective and a host sync per step). The guard's decision below replaces it.
            _skip_lightning_sigterm_broadcast(trainer)

    def decision_due(self, trainer) -> bool:
        """Whether the ranks agree on a signal after this optimizer step (the same answer on every rank)."""
        if trainer.world_size == 1:
            return True  # no collective: the flag is this process's own
        step = trainer.global_step
        return step % self.decide_every == 0 or step == self._last_global_step_saved

    def _any_rank_signalled(self, trainer) -> bool:
        if trainer.world_size == 1:
            return self.guard.requested  # this process's own flag: no collective
        return bool(trainer.strategy.reduce_boolean_decision(self.guard.requested, all=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if self.guard is None or not stepped:  # mid gradient accumulation: the state is not resumable
            return
        if not self.decision_due(trainer) or not self._any_rank_signalled(trainer):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        log.warning(
            "saved %s at step %d after %s; stopping",
            self.last_model_path,
            trainer.global_step,
            self.guard.signal_name if self.guard.requested else "a signal on another rank",
        )
        trainer.should_stop = True

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self.save_last:
            return
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        step_file = self._last_checkpoint_saved
        this_step_saved = (
            bool(step_file)  # Lightning starts it as "" (no checkpoint saved yet)
            and self._last_global_step_saved == trainer.global_step
            and os.path.abspath(step_file) != os.path.abspath(last)
        )
        linked = False
        if this_step_saved:
            # Rank 0 writes the files; every rank must take the same branch (a full save is a collective
            # under FSDP, which gathers the state), so rank 0's outcome is broadcast: once per checkpoint.
            ok = link_checkpoint(Path(step_file), Path(last)) if trainer.is_global_zero else False
            linked = bool(trainer.strategy.broadcast(ok))
        self.last_model_path = last
        if not linked:
            self._save_checkpoint(trainer, last)


def link_checkpoint(target: Path, link: Path) -> bool:
    """Make ``link`` a hard link to ``target``, atomically; False where the filesystem cannot (then write it).

    The link is made under a hidden temp name and renamed onto ``link``: ``link``
    is always either the old complete checkpoint or the new one. Remote paths
    (``s3://``) are never linked.
    """
    if "://" in str(target) or "://" in str(link):
        return False
    tmp = temp_name(link)
    try:
        tmp.unlink(missing_ok=True)
        os.link(target, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.info("could not hard-link %s to %s (%s): writing it in full", link, target, exc)
        return False
    fsync_dir(link.parent)  # the rename itself must reach the disk
    return True


def _skip_lightning_sigterm_broadcast(trainer) -> None:
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if epoch_loop is not None and hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while a ``PreemptionGuard`` owns the signals."""
