"""A stage of a run in a bucket, run on a local working copy: pull what it reads, run, push what it wrote.

``run_on_copy(cfg, stage, run)`` calls ``run(local_cfg)``: the settings of the same run with ``run_dir``
replaced by the local copy (``store.cache``/<protocol>/<bucket>/<path>), so every stage runs as it does on a
local run. Before, what the stage reads (``stage_io``) is pulled, each file checked against its folder's index,
and what it wrote before, so a finished job skips as on a local run: of a folder finished in the bucket only
the record the stage's check reads (``stage_io.MARKERS``), of an unfinished one whatever was pushed, and a
training job's uploaded checkpoints, to resume from.

When everything the stage writes is finished in the bucket (and no ``redo`` was asked for), it first runs on
only what its check of a rerun reads (``stage_io.CHECKS``: ``ddm partition`` on a fresh machine reads the data's
manifest, not 100 GB of shards, to find its partitions done). A stage that needs more there stops on the file
it lacks; then everything it reads is pulled and it runs again.

A job that writes one job folder (an expert, the router) holds that folder's lock in the bucket while it runs,
so two islands never train one expert. After the stage returns (not when it raises): its folders are pushed,
their indexes last, and its timing file beside them; a stage that only found its work finished in the bucket
pushes nothing. A training job that raises publishes its ``failed.json`` to its folder in the bucket; the next
successful attempt removes it. A stage in parts (``data.parts``, ...) is refused: its jobs would each push one
folder. Nothing of the credentials is written: the store is named by its ``redacted`` URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from ddm.io import read_json
from ddm.launch.encode_job import selected_clusters
from ddm.ranks import is_global_rank_zero
from ddm.settings import Settings, changed
from ddm.store import lock as store_lock
from ddm.store.job_folders import FAILED
from ddm.store.mirror import (
    INDEX,
    indexed_folders,
    local_files,
    pull_file,
    pull_folder,
    pull_matching,
    push_folder,
    read_index,
)
from ddm.store.objects import ObjectStore, working_copy_path
from ddm.store.stage_io import LOCKED, UNINDEXED, StageIO, check_whole, stage_io

log = logging.getLogger("ddm")


def local_copy(cfg: Settings, store: ObjectStore) -> Path:
    """The folder of the run's working copy on this machine."""
    return working_copy_path(store.url, cfg.store.cache)


def _is_file(key: str) -> bool:
    """A file's key (``clusters/report.json``, ``report.md``), not a folder's: its last part has a suffix."""
    return "." in key.rstrip("?").rsplit("/", 1)[-1]


def job_io(cfg: Settings, stage: str, store: ObjectStore, local: Path) -> StageIO:
    """The keys of this job of ``stage`` (``stage_io``), for its expert, its kind of run and its clusters."""
    expert_id = int(cfg.expert.id) if stage == "train-expert" else None
    latent = str(cfg.vae.kind) != "none"
    clusters = []
    if stage == "encode" and latent:  # the clusters it encodes: vae.clusters, or every one of the partitions
        k = int(read_json(pull_file(store, local, "partitions/manifest.json"))["num_clusters"])
        clusters = selected_clusters(cfg.vae.clusters, k)
    return stage_io(stage, expert_id, latent, clusters)


def run_on_copy(cfg: Settings, stage: str, run, timing_key=None):
    """Run ``stage`` of the run at ``cfg.run_dir`` (a URL) as ``run(local_cfg)`` on a local copy; see the module
    docstring. ``timing_key(local_cfg)``: the key of the timing file the stage's runner writes, pushed after the
    folders. Returns what ``run`` returned."""
    store = ObjectStore(str(cfg.run_dir))
    local = local_copy(cfg, store)
    check_whole(stage, cfg)
    io = job_io(cfg, stage, store, local)
    finished = [key for key in io.writes if _finished(store, key, io.markers.get(key))]
    # store.origin: the job knows its run's URL (a training job uploads its last.ckpt there)
    local_cfg = changed(cfg, {"run_dir": str(local), "store.origin": store.url})
    # The ranks of a multi-process job (DDP, FSDP) all run this: global rank 0 speaks for the job (the lock, the
    # push); every rank pulls, one process of a machine at a time, so the others find the files there (Checked).
    leader = is_global_rank_zero()
    locked = stage in LOCKED and leader
    what, lease_s = f"{stage} in {store.url}", float(cfg.store.lease_s)
    holder = store_lock.acquire(store, io.writes[0], what, lease_s) if locked else None
    lease = store_lock.Lease(store, io.writes[0], holder) if holder is not None else None
    try:
        with lease or contextlib.nullcontext():
            return _run_and_push(store, local, stage, io, finished, run, local_cfg, timing_key, leader, lease)
    finally:
        if holder is not None:
            store_lock.release(store, io.writes[0], holder)


def _run_and_push(
    store: ObjectStore, local: Path, stage: str, io: StageIO, finished, run, local_cfg, timing_key, leader, lease
):
    """The stage on the working copy (first on what its rerun check reads, when all it writes is finished), then
    its push; see ``run_on_copy``."""
    records = [io.markers[key] for key in finished]  # all a rerun's check reads of what it made
    transfers = int(local_cfg.store.transfers)
    result, ran, began = None, False, time.time()
    if io.checks is not None and len(finished) == len(io.writes) and not local_cfg.redo:
        with one_pull_at_a_time(local):
            _pull(store, local, stage, [*io.checks, *records], transfers)
        try:
            result, ran = run(local_cfg), True
        except FileNotFoundError as lacking:  # MissingInput too: it needs more than its check reads
            log.info("%s: %s; pulling all it reads", stage, lacking)
    if not ran:
        with one_pull_at_a_time(local):
            _pull(store, local, stage, [*io.reads, *records], transfers)
            unfinished = [] if io.adds else [key for key in io.writes if key not in finished]
            _pull_earlier_work(store, local, stage, unfinished, transfers)
        result = _run(store, local, stage, io.writes, run, local_cfg, leader)
    if not leader or (getattr(result, "skipped", False) and len(finished) == len(io.writes)):
        return result  # another rank's job, or done before and in the bucket: nothing to push
    if lease is not None:
        lease.check(f"{stage} in {store.url}")  # a job whose lock was taken over meanwhile pushes nothing
    _push(store, local, stage, io, timing_key, local_cfg, transfers, began)
    return result


def _pull(store: ObjectStore, local: Path, stage: str, keys, transfers: int) -> None:
    files, got = 0, 0
    for key in keys:
        optional, key = key.endswith("?"), key.rstrip("?")
        if "*" in key:  # none matching is no error
            pull_matching(store, local, key)
        elif optional and not store.list(key):
            continue
        elif key in UNINDEXED:
            for name in store.list(key):  # informational: taken as they are, with no index to check them by
                store.get_file(name, local / name)
        elif not _is_file(key):
            pulled = pull_folder(store, local, key, transfers=transfers)
            files, got = files + len(pulled["downloaded"]), got + pulled["bytes"]
        else:
            pull_file(store, local, key)
    log.info("%s: pulled %d files (%d MB) of %s into %s", stage, files, got >> 20, store.url, local)


def _pull_earlier_work(store: ObjectStore, local: Path, stage: str, unfinished: list[str], transfers: int) -> None:
    """What an earlier attempt pushed of folders not finished: pushed parts, and a training job's checkpoints."""
    for key in unfinished:
        if not _is_file(key) and indexed_folders(store, key):
            pull_folder(store, local, key, transfers=transfers)
        if stage in LOCKED and store.exists(f"{key}/checkpoints/{INDEX}"):
            pull_folder(store, local, f"{key}/checkpoints", transfers=transfers)  # an earlier attempt's, to resume from


@contextlib.contextmanager
def one_pull_at_a_time(local: Path) -> Iterator[None]:
    """Hold the working copy's pull lock (``flock``): the ranks of a job on one machine pull one after another,
    the first downloading, the others finding the files there. A filesystem without ``flock`` pulls unlocked."""
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".ddm-pull.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # some network filesystems refuse flock: concurrent pulls are still correct
            log.debug("no flock on %s (%s): pulling without it", local, error)
        yield


def _run(store: ObjectStore, local: Path, stage: str, writes: list[str], run, local_cfg, leader: bool):
    """``run(local_cfg)``; a training job that raises publishes its failure where every island can read it."""
    try:
        return run(local_cfg)
    except BaseException:
        failed = f"{writes[0]}/{FAILED}" if stage in LOCKED else None
        if leader and failed and (local / failed).exists():
            store.put_file(local / failed, failed)
        raise


def _push(store: ObjectStore, local: Path, stage: str, io: StageIO, timing_key, local_cfg, transfers, began) -> None:
    """Push what the stage wrote; a stage that adds to others' folders pushes the files it wrote (modified since
    it ``began``), never what the working copy holds from before."""
    only = {key: None for key in io.writes}
    if io.adds:
        only = {key: _written_since(local, key, began) for key in io.writes}
        only = {key: names for key, names in only.items() if names}
    if not only:
        return
    writes = list(only)
    sent = 0
    for key, names in only.items():
        if _is_file(key):  # a file of the run's own folder (report.md), with no index: for people to read
            if (local / key).exists():
                store.put_file(local / key, key)
            continue
        sent += push_folder(store, local, key, only=names, transfers=transfers, keep=io.adds)["bytes"]
    if stage in LOCKED:
        store.remove(f"{writes[0]}/{FAILED}")  # an earlier attempt's failure, on this or another node
    timing = None if timing_key is None else timing_key(local_cfg)
    if timing is not None and (local / timing).exists():
        store.put_file(local / timing, timing)
    log.info("%s: pushed %d MB to %s", stage, sent >> 20, store.url_of(writes[0]))


def _finished(store: ObjectStore, folder: str, record: str | None) -> bool:
    """Whether ``folder`` in the bucket was pushed whole with ``record``, which says it is finished."""
    if record is None:
        return False
    index = read_index(store, folder)
    return index is not None and record[len(folder) + 1 :] in index["files"]


def _written_since(local: Path, folder: str, began: float) -> tuple[str, ...]:
    """The files of ``local/folder`` (names relative to it) modified since ``began``."""
    return tuple(
        key[len(folder) + 1 :] for key, path in local_files(local, folder).items() if path.stat().st_mtime >= began - 1
    )
