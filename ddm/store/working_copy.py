"""A stage of a run in a bucket, run on a local working copy: pull what it reads, run, push what it wrote.

``working_copy(cfg, stage)`` yields a ``Copy``: the settings of the same run with ``run_dir`` replaced by the
local copy (``store.cache``/<protocol>/<bucket>/<path>), so every stage runs as it does on a local run. Before:
the stage's reads (``stage_io``) are pulled, each checked against its folder's index, and what it wrote before,
so a finished job skips as on a local run: of a folder finished in the bucket only the record the stage's check
reads (``stage_io.MARKERS``: a rerun does not pull 10 GB of samples to find them done), of an unfinished one
whatever was pushed, and a training job's uploaded checkpoints, to resume from. A job that writes one job folder
(an expert, the router) holds that folder's lock in the bucket while it runs, so two islands never train one
expert. After the stage returns (not when it raises): its folders are pushed, their indexes last, and its
timing file beside them; a stage that only found its work finished in the bucket pushes nothing. A training job
that raises publishes its ``failed.json`` to its folder in the bucket; the next successful attempt removes it.
A stage in parts (``data.parts``, ...) is refused: its jobs would each push one folder. Nothing of the
credentials is written: the store is named by its ``redacted`` URL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ddm.settings import Settings, changed
from ddm.store import lock as store_lock
from ddm.store.mirror import INDEX, indexed_folders, pull_file, pull_folder, pull_matching, push_folder, read_index
from ddm.store.objects import ObjectStore, working_copy_path
from ddm.store.stage_io import check_whole, marker, stage_keys

log = logging.getLogger("ddm")

LOCKED = ("train-expert", "train-router")  # stages that own one job folder: locked in the bucket
FAILED = "failed.json"  # what a training job that raised leaves in its folder (ddm.train.job)


def local_copy(cfg: Settings, store: ObjectStore) -> Path:
    """The folder of the run's working copy on this machine."""
    return working_copy_path(store.url, cfg.store.cache)


def _is_file(key: str) -> bool:
    return key.endswith(".json")


@dataclass
class Copy:
    """The stage's settings on the working copy; the runner sets ``skipped`` when the stage found its work done."""

    cfg: Settings
    skipped: bool = False


@contextlib.contextmanager
def working_copy(cfg: Settings, stage: str, timing_key=None) -> Iterator[Copy]:
    """Run ``stage`` of the run at ``cfg.run_dir`` (a URL) on a local copy; see the module docstring.

    ``timing_key(local_cfg)``: the key of the timing file the stage's runner writes, pushed after the folders.
    """
    store = ObjectStore(str(cfg.run_dir))
    local = local_copy(cfg, store)
    expert_id = int(cfg.expert.id) if stage == "train-expert" else None
    reads, writes = stage_keys(stage, expert_id)
    check_whole(stage, cfg)
    got = 0
    for key in reads:
        optional, key = key.endswith("?"), key.rstrip("?")
        if optional and not store.list(key):
            continue
        if "*" in key:
            pull_matching(store, local, key)
        elif _is_file(key):
            pull_file(store, local, key)
        else:
            got += pull_folder(store, local, key)["bytes"]
    finished = [key for key in writes if _finished(store, key, expert_id)]
    for key in writes:  # what the stage made before (another island, an earlier attempt): it skips finished work
        if key in finished:
            pull_file(store, local, marker(key, expert_id))  # all a rerun's check reads
        elif not _is_file(key) and indexed_folders(store, key):
            got += pull_folder(store, local, key)["bytes"]
        if stage in LOCKED and key not in finished and store.exists(f"{key}/checkpoints/{INDEX}"):
            got += pull_folder(store, local, f"{key}/checkpoints")["bytes"]  # an earlier attempt's, to resume
    log.info("%s: pulled %d MB of %s into %s", stage, got >> 20, store.url, local)
    holder = store_lock.acquire(store, writes[0], f"{stage} in {store.url}") if stage in LOCKED else None
    failed = f"{writes[0]}/{FAILED}"
    try:
        # store.origin: the job knows its run's URL (a training job uploads its last.ckpt there)
        copy = Copy(changed(cfg, {"run_dir": str(local), "store.origin": store.url}))
        try:
            yield copy
        except BaseException:
            if stage in LOCKED and (local / failed).exists():  # the job's failure, where every island can read it
                store.put_file(local / failed, failed)
            raise
        if copy.skipped and len(finished) == len(writes):
            return  # done before, and in the bucket: the working copy holds only its records
        sent = sum(push_folder(store, local, key)["bytes"] for key in writes)
        if stage in LOCKED:
            store.remove(failed)  # an earlier attempt's failure, on this or another node
        timing = None if timing_key is None else timing_key(copy.cfg)
        if timing is not None and (local / timing).exists():
            store.put_file(local / timing, timing)
        log.info("%s: pushed %d MB to %s", stage, sent >> 20, store.url_of(writes[0]))
    finally:
        if holder is not None:
            store_lock.release(store, writes[0], holder)


def _finished(store: ObjectStore, folder: str, expert_id: int | None) -> bool:
    """Whether ``folder`` in the bucket was pushed whole with the record that says it is finished."""
    record = marker(folder, expert_id)
    if record is None:
        return False
    index = read_index(store, folder)
    return index is not None and record[len(folder) + 1 :] in index["files"]
