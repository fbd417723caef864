"""What ``ddm status`` and ``ddm submit`` read of a run's job folders (the experts, the router, the student), on
local disk or in a bucket.

``run_view(cfg)`` gives a ``RunView``: the run's small records and, for each job folder, its finished record, the
failure a job published, who holds its lock and the step of its last checkpoint. For a run in a bucket
(``run_dir=s3://...``) all of these come from the bucket: one listing of each top folder, then a few small
objects, so any machine sees which islands have finished, which are training and which failed. Only what is
this machine's own comes from local disk: its SLURM scripts and logs, kept in the run's working copy
(``store.cache``), where the jobs it submits write them.

A job in a bucket is done when its folder's index (``ddm.store.mirror``) lists its record: the folder was pushed
whole. Its lock is the bucket's (``ddm.store.lock``), judged by the same rules as a local one and by its lease.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import MissingInput, Unusable
from ddm.io import read_json
from ddm.launch import lock
from ddm.settings import Settings
from ddm.store import lock as store_lock
from ddm.store.mirror import INDEX, pull_file, read_index
from ddm.store.objects import ObjectStore, is_url, working_copy_path

FAILED = "failed.json"  # what a training job that raised leaves in its folder (ddm.train.job)
_STEP = re.compile(r"step[-=_]?(\d+)")


def failure_text(info) -> str:
    """The error a ``failed.json`` reports."""
    if isinstance(info, dict):
        for key in ("error", "message", "reason", "exception"):
            if info.get(key):
                return str(info[key])
    return str(info)


class JobFolder:
    """A job's folder on local disk: ``record`` is its finished record's path."""

    def __init__(self, folder: Path, record: Path):
        self.folder, self._record = Path(folder), Path(record)

    def record(self) -> dict | None:
        return read_json(self._record) if self._record.exists() else None

    def holder(self) -> str | None:
        return lock.held_by(self.folder)

    def failure(self) -> str | None:
        path = self.folder / FAILED
        if not path.exists():
            return None
        try:
            return failure_text(read_json(path))
        except (OSError, ValueError) as e:
            return f"unreadable {FAILED} ({e})"

    def checkpoints(self) -> bool:
        return any((self.folder / "checkpoints").glob("*.ckpt"))

    def checkpoint_step(self) -> int | None:
        """The highest step among the step checkpoints' names, None when there is none."""
        names = (self.folder / "checkpoints").glob("*.ckpt")
        steps = [int(m.group(1)) for p in names if (m := _STEP.search(p.stem))]
        return max(steps) if steps else None


class BucketJobFolder(JobFolder):
    """A job's folder in a bucket, ``key`` under ``store``; ``keys``: the objects under it."""

    def __init__(self, store, key: str, record_name: str, keys: set[str]):
        self.store, self.key, self.record_name, self.keys = store, key.strip("/"), record_name, keys

    def record(self) -> dict | None:
        index = read_index(self.store, self.key) if f"{self.key}/{INDEX}" in self.keys else None
        if index is None or self.record_name not in index["files"]:
            return None  # not pushed whole yet
        return self.store.read_json(f"{self.key}/{self.record_name}")

    def holder(self) -> str | None:
        return store_lock.held_by(self.store, self.key) if f"{self.key}/{lock.LOCK_NAME}" in self.keys else None

    def failure(self) -> str | None:
        if f"{self.key}/{FAILED}" not in self.keys:
            return None
        try:
            return failure_text(self.store.read_json(f"{self.key}/{FAILED}"))
        except (FileNotFoundError, Unusable) as e:
            return f"unreadable {FAILED} ({e})"

    def checkpoints(self) -> bool:
        return f"{self.key}/checkpoints/{INDEX}" in self.keys  # uploaded whole (CheckpointUpload)

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint uploaded last, as its upload recorded it (``CheckpointUpload``)."""
        if f"{self.key}/checkpoints/{INDEX}" not in self.keys:
            return None
        step = (read_index(self.store, f"{self.key}/checkpoints") or {}).get("step")
        return int(step) if isinstance(step, int) else None


@dataclass
class RunView:
    """A run as ``ddm status`` and ``ddm submit`` see it.

    ``where``: the run as its jobs are given it and SLURM's comments name it (an absolute path, or the bucket's
    URL); ``local``: this machine's folder of the run (the run itself, or its working copy), where its scripts
    and its jobs' logs go; ``store``: the bucket, or None.
    """

    where: str
    local: RunDir
    store: ObjectStore | None = None
    _listed: dict = field(default_factory=dict)

    @property
    def in_bucket(self) -> bool:
        return self.store is not None

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.local.root).as_posix()

    def _keys(self, top: str) -> set[str]:
        if top not in self._listed:
            self._listed[top] = set(self.store.list(top))
        return self._listed[top]

    def name_of(self, path: Path) -> str:
        """How messages name the run's ``path`` (a local path): itself, or its URL in the bucket."""
        return f"{self.where}/{self._rel(path)}" if self.in_bucket else str(path)

    def read(self, path: Path) -> dict | None:
        """A small record of the run, by its local path (``rd.cluster_report``); None when it is not there (in a
        bucket: not in a folder pushed whole). One from a bucket is checked against its folder's index."""
        if not self.in_bucket:
            return read_json(path) if Path(path).exists() else None
        try:
            return read_json(pull_file(self.store, self.local.root, self._rel(path)))
        except MissingInput:
            return None

    def has(self, folder: Path) -> bool:
        """Whether the run has anything in ``folder``."""
        if not self.in_bucket:
            return Path(folder).exists()
        rel = self._rel(folder)
        return any(k.startswith(f"{rel}/") for k in self._keys(rel.split("/")[0]))

    def job(self, folder: Path, record: Path) -> JobFolder:
        """The job folder at ``folder`` (``rd.expert(3)``) whose finished record is ``record``."""
        if not self.in_bucket:
            return JobFolder(folder, record)
        rel = self._rel(folder)
        keys = {k for k in self._keys(rel.split("/")[0]) if k.startswith(f"{rel}/")}
        return BucketJobFolder(self.store, rel, Path(record).name, keys)


def run_view(cfg: Settings) -> RunView:
    """The run at ``cfg.run_dir``: a local folder, or a bucket (then this machine's working copy holds its logs)."""
    if not is_url(cfg.run_dir):
        rd = RunDir(Path(cfg.run_dir).resolve())
        return RunView(str(rd.root), rd)
    store = ObjectStore(str(cfg.run_dir))
    return RunView(store.url, RunDir(working_copy_path(store.url, cfg.store.cache).resolve()), store)
