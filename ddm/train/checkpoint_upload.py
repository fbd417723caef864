"""``CheckpointUpload``: a training job of a run in a bucket sends its ``last.ckpt`` there, now and then.

Checkpoints are written to local disk as on any run (every ``ckpt_every`` steps: fast, and nothing waits on the
network). Every ``every_s`` seconds, global rank 0 sends ``last.ckpt`` to ``<job folder>/checkpoints/`` in the
bucket, if it changed since the last upload, and the folder's index last (``ddm.store.mirror``): the file's sha256
and size, and ``step``, the checkpoint's global step. Each upload is a new object (``last-<step>-<token>.ckpt``,
which the index names as ``last.ckpt``) and the earlier ones are removed after the index, so a job killed mid-upload
leaves the previous checkpoint whole and indexed. A job resumed on another node pulls it and resumes from it.

The upload runs in the background, so no step waits for the network:

- the step that finds an upload due freezes ``last.ckpt`` as it is: a hard link ``checkpoints/.upload/last.ckpt``
  (hidden: never pushed with the folder). Checkpoints replace ``last.ckpt`` by renaming a new file onto it
  (``AtomicCheckpointIO``, ``JobCheckpoint``'s link; Lightning's own save does too where its temp folder is on the
  same filesystem), so a later checkpoint never changes the frozen one. Where the filesystem has no hard links,
  the file is opened instead and copied by the upload. A training step pays the clock check; the step that starts
  an upload pays a stat and a link;
- one thread uploads it (checks that it loads, takes its sha256 and step, sends it, then the index). One upload
  at a time: when the interval comes round while one is still running, the next is taken at the first step after
  it finished;
- an upload that fails is logged with the bucket's URL and stops training at the next step (``Unusable``, naming
  the URL): a job must not run on for days believing its state is safe when the bucket refuses it.

When a signal stops the job before its last step (before a requeue), ``on_train_end`` waits for an upload in
flight, then sends the newest ``last.ckpt`` before the job exits. At the end of a finished fit it only waits for an
upload in flight: the job's folder, with expert.pt, is pushed then. When training fails, it waits up to
``JOIN_ON_ERROR_S`` for an upload in flight to finish.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import lightning as L

from ddm.errors import Unusable

log = logging.getLogger("ddm")

SNAPSHOT_DIR = ".upload"  # under checkpoints/: hidden, so push_folder skips it and no checkpoint glob matches it
JOIN_ON_ERROR_S = 600.0  # a failing job waits this long for an upload in flight (a good checkpoint) to finish


class CheckpointUpload(L.Callback):
    """Upload ``run_root/key/checkpoints/last.ckpt`` to ``store`` (``key``: the job folder's, ``experts/expert-03``)
    every ``every_s`` seconds, in the background."""

    def __init__(self, store, run_root: Path, key: str, every_s: float):
        self.store, self.root, self.key, self.every_s = store, Path(run_root), key.strip("/"), float(every_s)
        self.folder = self.root / self.key
        self.url = store.url_of(f"{self.key}/checkpoints/last.ckpt")
        self._seen: tuple | None = None  # (inode, mtime, size) of the last.ckpt last taken for upload
        self._at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None  # an upload thread's error, raised in the training process
        self.uploads = 0

    def _snapshot(self) -> tuple[Path, object] | None:
        """Freeze last.ckpt for upload: ``(snapshot, None)`` linked, ``(snapshot, open last.ckpt)`` to copy from;
        None when there is none or it was taken already."""
        last = self.folder / "checkpoints" / "last.ckpt"
        try:
            st = last.stat()
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._seen:
            return None
        snap = last.parent / SNAPSHOT_DIR / last.name
        snap.parent.mkdir(exist_ok=True)
        snap.unlink(missing_ok=True)  # only while no upload is in flight: the last one is done with it
        source = None
        try:
            os.link(last, snap)
        except OSError as exc:  # EPERM, EXDEV, ENOTSUP: no hard links here. An open file keeps its bytes as well
            log.debug("cannot hard-link %s (%s): the upload copies it", last, exc)
            source = open(last, "rb")  # the upload copies from it, then closes it
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        return snap, source

    def _upload(self, snap: Path, source, why: str) -> None:
        """Send the snapshot, then the index naming it and its step (last: the folder is whole from then on)."""
        from ddm.io import sha256_file
        from ddm.store.mirror import INDEX
        from ddm.train.checkpoint_io import inspect_checkpoint

        if source is not None:
            with source, open(snap, "wb") as out:
                shutil.copyfileobj(source, out, 16 << 20)
        ckpt, problem = inspect_checkpoint(snap)  # reads the pickled metadata only (mmap)
        if problem:  # never replace the bucket's checkpoint with one a resume would skip
            log.warning("not uploading %s: it %s; %s keeps the previous one", snap, problem, self.url)
            return
        step = int(ckpt["global_step"])
        del ckpt  # let go of the mapping
        stamp = _stamp(snap)
        entry = dict(sha256=sha256_file(snap), size=stamp[1])
        folder = f"{self.key}/checkpoints"
        # A new object each time, the index naming it, then the previous one removed: a job killed at any point
        # leaves an index whose object is there and whole (replacing last.ckpt in place would not).
        entry["object"] = f"last-{step:09d}-{uuid.uuid4().hex[:8]}.ckpt"
        self.store.put_file(snap, f"{folder}/{entry['object']}")
        if _stamp(snap) != stamp:  # written in place, not replaced: what was sent may not be what was hashed
            raise Unusable(f"{snap} changed while it was uploaded to {self.url}: checkpoints must be replaced")
        self.store.put_json(dict(files={"last.ckpt": entry}, step=step), f"{folder}/{INDEX}")
        for key in self.store.list(folder):  # the previous upload, and any cut off before its index
            name = key.rsplit("/", 1)[-1]
            if name.startswith("last-") and name.endswith(".ckpt") and name != entry["object"]:
                self.store.remove(key)
        self.uploads += 1
        log.info("uploaded %s (step %d, %d MB, %s) -> %s", snap, step, entry["size"] >> 20, why, self.url)

    def _run(self, snap: Path, source, why: str) -> None:
        try:
            self._upload(snap, source, why)
        except BaseException as exc:  # kept for the training process, which raises it
            log.error("uploading %s to %s failed: %s: %s", snap, self.url, type(exc).__name__, exc)
            self._failed = exc
        finally:
            snap.unlink(missing_ok=True)  # its disk space goes when last.ckpt moves on

    def _raise_if_failed(self) -> None:
        failed, self._failed = self._failed, None
        if failed is not None:
            raise Unusable(
                f"uploading last.ckpt to {self.url} failed ({type(failed).__name__}: {failed}): the bucket does not "
                f"hold this job's newest checkpoint. Make the bucket writable again (credentials, quota, network) "
                f"and resume the job: it starts from its local checkpoints"
            ) from failed

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        self._raise_if_failed()
        if time.monotonic() - self._at < self.every_s:
            return
        if self._busy():
            log.debug("an upload to %s is still running: the next one waits for it", self.url)
            return
        taken = self._snapshot()
        if taken is None:  # unchanged: look again at the next step
            return
        self._at = time.monotonic()
        why = f"every {self.every_s:g} s"
        self._thread = threading.Thread(target=self._run, args=(*taken, why), name="ddm-checkpoint-upload", daemon=True)
        self._thread.start()

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self._thread is not None:
            self._thread.join()  # the process must not exit mid-upload
        self._raise_if_failed()
        finished = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
        if finished:  # the job pushes its folder, with expert.pt, next
            return
        taken = self._snapshot()  # stopped by a signal: the state to resume from reaches the bucket now
        if taken is not None:
            self._run(*taken, "stopped before the last step")
            self._raise_if_failed()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        log.info("training failed: waiting up to %g s for the upload to %s in flight", JOIN_ON_ERROR_S, self.url)
        self._thread.join(JOIN_ON_ERROR_S)
        if self._thread.is_alive():
            log.warning("gave up waiting for the upload to %s: it ends with this process", self.url)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def checkpoint_uploads(store_settings, run_root: Path, folder: Path) -> tuple:
    """``(CheckpointUpload,)`` for a training job of a run in a bucket, else ``()``: ``store_settings.origin`` (the
    run's URL, set by its working copy) is where ``folder``'s last.ckpt goes, every ``checkpoint_every_s``."""
    if store_settings.origin is None:
        return ()
    from ddm.store import ObjectStore

    key = Path(folder).relative_to(run_root).as_posix()
    every_s = float(store_settings.checkpoint_every_s)
    return (CheckpointUpload(ObjectStore(store_settings.origin), Path(run_root), key, every_s),)
