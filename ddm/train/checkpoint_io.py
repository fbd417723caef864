"""Checkpoints that are either complete or absent, and choosing the one to resume from.

A job can be killed at any instant (``kill -9``, a node failure, SLURM's
SIGKILL after the grace period), also while it writes a checkpoint. So:

- ``AtomicCheckpointIO`` writes every checkpoint (``step-*.ckpt`` and
  ``last.ckpt``, which Lightning saves separately, not as a copy or link) to a
  hidden temp file in the same folder, fsyncs it, and renames it onto the
  target: the target is always the old complete file or the new complete one;
- ``latest_complete_checkpoint`` picks, before a job resumes, the newest
  checkpoint that loads and holds what a resume needs, names and skips any
  that do not, and removes temp files left by a writer that died.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddm.errors import BadInput

log = logging.getLogger("ddm")

# For tests only: seconds to sleep after a checkpoint's temp file is complete and
# before it is renamed into place, so a test can kill the job mid-save deterministically.
SLOW_CHECKPOINT_ENV = "DDM_FAULT_SLOW_CHECKPOINT_S"

TEMP_SUFFIX = ".tmp"
# What Lightning needs to resume training where it stopped.
REQUIRED_KEYS = ("global_step", "state_dict", "loops", "optimizer_states", "callbacks")


def temp_name(path: Path) -> Path:
    """The hidden temp file a checkpoint is written to; no checkpoint glob matches it."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, or a power loss could bring back the old name.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pause_for_tests() -> None:
    delay = os.environ.get(SLOW_CHECKPOINT_ENV)
    if delay:
        time.sleep(float(delay))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a partly written checkpoint under its final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote filesystems: renames are not atomic there anyway
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            _pause_for_tests()
            os.replace(tmp, path)
        finally:
            if tmp.exists():  # the save failed (disk full, exception): drop the partial file
                tmp.unlink()
        fsync_dir(path.parent)


def inspect_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """``(checkpoint, None)`` when ``path`` can be resumed from, else ``(None, why not)``.

    Loading with ``mmap`` reads only the pickled metadata and the zip index, not
    the tensors, so checking the checkpoint of a large model costs little; a
    truncated file has lost its index and fails here.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # any failure to load means: not a usable checkpoint
        return None, f"does not load ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(ckpt, dict):
        return None, f"holds a {type(ckpt).__name__}, not a Lightning checkpoint"
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        return None, f"lacks {missing}"
    return ckpt, None


def remove_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete temp files of checkpoint writers that died before their rename.

    Called before a job starts training, when no writer of this job is alive.
    """
    removed = []
    for tmp in sorted(ckpt_dir.glob(f".*{TEMP_SUFFIX}")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def candidate_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``last.ckpt`` first (it wins ties), then the step checkpoints."""
    last = ckpt_dir / "last.ckpt"
    return ([last] if last.is_file() else []) + sorted(ckpt_dir.glob("step-*.ckpt"))


def latest_complete_checkpoint(ckpt_dir: Path, identity: dict | None = None) -> Path | None:
    """The checkpoint in ``ckpt_dir`` with the highest step among those that load completely.

    Broken files (truncated, zero-length, not a checkpoint) are logged by name
    and skipped; they are left in place and overwritten by the next save. A
    complete checkpoint whose recorded ``identity`` (clustering id, partition
    checksum, an expert's target) differs from the job's is an error: resuming would mix runs.
    """
    if not ckpt_dir.is_dir():
        return None
    for tmp in remove_temp_files(ckpt_dir):
        log.warning("removed %s: a checkpoint write that never finished (the job was killed while saving)", tmp)
    best, best_step = None, -1
    for path in candidate_checkpoints(ckpt_dir):
        ckpt, problem = inspect_checkpoint(path)
        if problem:
            log.warning("skipping checkpoint %s: it %s; resuming from an older complete one", path, problem)
            continue
        _check_identity(path, ckpt.get("ddm") or {}, identity)
        step = int(ckpt["global_step"])
        if step > best_step:
            best, best_step = path, step
    return best


def _check_identity(path: Path, stored: dict, identity: dict | None) -> None:
    if not identity:
        return
    differs = {k: (stored[k], v) for k, v in identity.items() if k in stored and stored[k] != v}
    if differs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differs.items())
        raise BadInput(
            f"{path} was written by a job on other data or with another target ({detail}); resuming would "
            f"mix artefacts of different jobs. Start this job afresh with redo=true, "
            f"or use the run directory it belongs to"
        )
