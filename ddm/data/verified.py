"""Checking a job's shards once per island and once per change, not on every rank at every start.

A training job must not train on shards that differ from their manifest (``ddm.data.shards.verify``),
but hashing an ImageNet partition (tens of GB) on each of 8 ranks at each start and requeue costs
more than the check is worth. So a job checks its shards with ``verified_shards``:

- **once per island**: only global rank 0 reads the shards. The other ranks run the same stage code
  before any process group exists (srun starts all ranks at once; Lightning starts ranks 1..n-1
  inside rank 0's fit, after rank 0 has checked), so they cannot wait on a barrier. They wait on a
  file instead: rank 0 writes what it checked to ``<job folder>/verified.json``, and a rank other
  than 0 goes on once that file vouches for every shard of the set *as the shard is now* (same size
  and mtime, and the sha256 the manifest expects), which a ``stat`` per shard tells. No token of
  "this start" is needed: a record from an earlier start that still matches every file is as good
  as a new one, and one that does not match is waited on until rank 0 has checked again.
  When rank 0 refuses a shard it writes that too, so the other ranks stop at once with its message
  instead of waiting for their timeout.
- **once per change**: rank 0 rereads only the shards whose size or mtime changed since
  ``verified.json`` recorded them, or that are new; a second start of an unchanged job hashes nothing.

``verified.json`` lives in the job's own folder (a job writes nowhere else), written whole to a
temporary file and renamed, so a reader never sees half of it. Deleting it (or ``redo=true``,
which deletes the folder) makes the next start check every shard again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ddm.data.shards import MANIFEST, ShardMismatch, check_shards, load_manifest, missing_shard, shard_paths, stamp
from ddm.errors import BadInput, Unusable
from ddm.io import read_json, write_json
from ddm.ranks import is_global_rank_zero
from ddm.settings import Training

log = logging.getLogger("ddm")

CACHE = "verified.json"
# How long a rank other than 0 waits for rank 0's check: hashing tens of GB from network storage at
# 50-100 MB/s takes several minutes, and a rank 0 that died is better reported late than never.
WAIT_S = 3600.0
POLL_S = 2.0


def cache_path(job_dir: str | os.PathLike) -> Path:
    return Path(job_dir) / CACHE


def _set_key(folder) -> str:
    """A shard set's entry in verified.json: its absolute folder (a moved run dir is checked again)."""
    return os.path.abspath(folder)


def _read_cache(path: Path) -> dict:
    """verified.json's content, or an empty record when it is absent or unreadable (then everything is checked)."""
    try:
        cache = read_json(path)
    except (FileNotFoundError, ValueError):  # missing, or damaged: a cache is never a reason to fail a job
        return {}
    return cache if isinstance(cache, dict) and isinstance(cache.get("sets"), dict) else {}


def verified_shards(
    folder: str | os.PathLike,
    job_dir: str | os.PathLike,
    *,
    manifest: dict | None = None,
    env=None,
    wait_s: float = WAIT_S,
    poll_s: float = POLL_S,
    wait_setting: str = "expert.verify_wait_s",
    processes: int | None = None,
) -> dict:
    """The manifest of shard set ``folder``, every shard checked against it for the job in ``job_dir``.

    On global rank 0: check (rereading only what changed since ``job_dir/verified.json``) and record.
    On any other rank: wait until ``verified.json`` vouches for every shard as it is now (see the
    module docstring); raise rank 0's refusal, a missing shard at once, or ``Unusable`` after ``wait_s``
    (``wait_setting``: the config key that sets it, for the message). ``manifest``: ``folder``'s, when the
    caller has read it already (so that the shards are checked against the very manifest it checked).
    """
    manifest = load_manifest(folder) if manifest is None else manifest
    path = cache_path(job_dir)
    # A job of one process checks for itself, whatever rank variables its launcher set (independent
    # one-GPU jobs started by one `srun -n8` each see SLURM_PROCID 0..7).
    if processes == 1 or is_global_rank_zero(env):
        check_recorded(folder, manifest, path)
        return manifest
    waited, started, told = 0.0, time.monotonic(), 0.0
    seen = None  # verified.json as last read: the shards are stat'ed again only when rank 0 wrote it anew
    while True:
        now = _file_stamp(path)
        if now != seen:
            seen = now
            if _vouched(folder, manifest, path):
                break
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise Unusable(
                f"waited {waited:.0f}s for global rank 0 to check the shards of {folder} (it records them in "
                f"{path}): rank 0 failed or is still hashing; see its log (its error is the one to fix), or "
                f"give it longer with {wait_setting}=<seconds>"
            )
        if waited - told >= 60:
            told = waited
            log.info("waiting for global rank 0 to check the shards of %s (%.0fs so far)", folder, waited)
        time.sleep(poll_s)
    return manifest


def _file_stamp(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def check_recorded(folder, manifest: dict, path: Path) -> None:
    """Check shard set ``folder`` against ``manifest``, rereading only what changed since ``path`` recorded it.

    For a stage run as one process (embed, partition, encode): no ranks to wait for. ``path`` lies in
    the stage's own output folder.
    """
    cache = _read_cache(path)
    sets = cache.get("sets", {})
    key = _set_key(folder)
    known = (sets.get(key) or {}).get("files") or {}
    try:
        files = check_shards(folder, manifest, known)
    except ShardMismatch as e:
        # The other ranks read this and stop with the same message, rather than wait for their timeout.
        sets[key] = dict(files=known, refused=dict(e.found, file=e.shard, message=str(e)))
        write_json(path, dict(sets=sets))
        raise
    hashed = sum(1 for name, entry in files.items() if known.get(name) != entry)
    log.info(
        "checked %d shards of %s against %s (%d read, %d unchanged since %s)",
        len(files),
        folder,
        MANIFEST,
        hashed,
        len(files) - hashed,
        path.name,
    )
    sets[key] = dict(files=files)
    write_json(path, dict(sets=sets))


def _vouched(folder, manifest: dict, path: Path) -> bool:
    """True when rank 0's record covers every shard of ``folder`` as it is now.

    Raises rank 0's refusal of a shard that is still as rank 0 found it, and a missing shard at once.
    """
    entry = _read_cache(path).get("sets", {}).get(_set_key(folder)) or {}
    files = entry.get("files") or {}
    ok = True
    for s, p in zip(manifest["shards"], shard_paths(folder, manifest)):
        try:
            now = dict(stamp(p), sha256=s["sha256"])
        except FileNotFoundError:
            raise missing_shard(folder, p) from None
        refused = entry.get("refused") or {}
        if refused.get("file") == s["path"] and {k: refused.get(k) for k in now} == now:
            # rank 0 found this very file (same size, mtime and expected sha256) damaged: its verdict holds
            raise BadInput(refused["message"])
        ok = ok and files.get(s["path"]) == now
    return ok


def wait_seconds(section: Training) -> float:
    """``<job>.verify_wait_s`` of a job's settings group (``expert``, ``router``, ``distill``), or ``WAIT_S``."""
    wait = section.verify_wait_s
    return WAIT_S if wait is None else float(wait)


def verified_shard_sets(
    folders, manifests, job_dir, section: Training, what: str, processes: int | None = None
) -> None:
    """``verified_shards`` for each of a job's shard sets (the router and distillation read every partition),
    all recorded in the one ``verified.json`` of ``job_dir``; ``what`` names the config section."""
    for folder, manifest in zip(folders, manifests):
        verified_shards(
            folder,
            job_dir,
            manifest=manifest,
            wait_s=wait_seconds(section),
            wait_setting=f"{what}.verify_wait_s",
            processes=processes,
        )
