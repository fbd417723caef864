"""``CheckpointUpload``: a training job of a run in a bucket sends its ``last.ckpt`` there, now and then.

Checkpoints are written to local disk as on any run (every ``ckpt_every`` steps: fast, and nothing waits on the
network). This callback uploads ``last.ckpt`` to ``<job folder>/checkpoints/`` in the bucket when it has changed
and ``every_s`` seconds have passed since the last upload, and once more when a signal stops the job (before a
requeue), with the folder's index last (``ddm.store.mirror``): a job resumed on another node pulls it and resumes
from it. No upload at the end of a finished fit: the job's folder, with expert.pt, is pushed then. Training steps
pay nothing for it but a file's modification time, read on global rank 0 only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

log = logging.getLogger("ddm")


class CheckpointUpload(L.Callback):
    """Upload ``run_root/key/checkpoints/last.ckpt`` to ``store`` (``key``: the job folder's, ``experts/expert-03``)
    every ``every_s`` seconds."""

    def __init__(self, store, run_root: Path, key: str, every_s: float):
        self.store, self.root, self.key, self.every_s = store, Path(run_root), key.strip("/"), float(every_s)
        self.folder = self.root / self.key
        self._sent: float | None = None  # the mtime of the last.ckpt uploaded
        self._at = time.monotonic()
        self.uploads = 0

    def _last(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"

    def upload(self, why: str) -> bool:
        """Send last.ckpt if it changed since the last upload; True when it did."""
        from ddm.store.mirror import push_folder

        last = self._last()
        if not last.exists() or (self._sent is not None and last.stat().st_mtime_ns == self._sent):
            return False
        mtime = last.stat().st_mtime_ns
        pushed = push_folder(self.store, self.root, f"{self.key}/checkpoints", only=("last.ckpt",))
        self._sent, self._at, self.uploads = mtime, time.monotonic(), self.uploads + 1
        log.info("uploaded %s (%d MB, %s) -> %s", last, pushed["bytes"] >> 20, why, self.store.url_of(self.key))
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and time.monotonic() - self._at >= self.every_s:
            self.upload(f"every {self.every_s:g} s")

    def on_train_end(self, trainer, pl_module) -> None:
        finished = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
        if trainer.is_global_zero and not finished:  # stopped by a signal: the state to resume from
            self.upload("stopped before the last step")
