"""One job at a time in a job's folder: ``lock.json``, held by a training job while it trains.

Two jobs on one expert (``ddm submit`` run twice, a hand-started ``ddm
train-expert`` beside a requeued SLURM task) would write the same checkpoints
and record. So a job first creates ``<job folder>/lock.json``: written whole
to a temporary file, then hard-linked to its name, which fails when the name
exists, so exactly one job gets it and no reader ever sees half a lock. A
second job finds it and refuses, naming the first. The lock names its holder:
host, pid (with the process's start time, so a reused pid does not pass for
it), SLURM job, array task and restart count, start time and command.

A lock whose holder is gone is stale and is taken over with a warning:

- taken on this host: its process is no longer running;
- taken by this very SLURM job before a requeue (same job id, a higher
  ``SLURM_RESTART_COUNT``): SLURM runs one instance of a job at a time;
- taken on another host by a SLURM job that SLURM (when its commands are
  here) says is no longer running.

A lock from another host that nothing here can check is refused; the message
says to delete it if that job is known to be dead. Only global rank 0 of a
multi-process job takes the lock: the other ranks are the same job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from ddm.errors import Locked
from ddm.launch import slurm
from ddm.ranks import RANK_VARIABLES, is_global_rank_zero  # noqa: F401 (the stages import them from here)

log = logging.getLogger("ddm")

LOCK_NAME = "lock.json"
# SLURM states in which a job's processes may still be writing (a suspended job resumes where it was).
ALIVE_SLURM_STATES = slurm.RUNNING_STATES | {"SUSPENDED", "STOPPED"}

LIVE, STALE, UNKNOWN = "live", "stale", "unknown"


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def this_holder() -> dict:
    """What the lock of a job started by this process says about it."""
    env = os.environ
    array = env.get("SLURM_ARRAY_JOB_ID")
    return dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_started=_process_started(os.getpid()),
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        slurm_array_task=f"{array}_{env.get('SLURM_ARRAY_TASK_ID')}" if array else None,
        slurm_restart_count=int(env["SLURM_RESTART_COUNT"]) if env.get("SLURM_RESTART_COUNT", "").isdigit() else None,
        started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in sys.argv),
        token=uuid.uuid4().hex,  # tells this lock from any other, also one with the same host and pid
    )


def describe(holder: dict) -> str:
    """``pid 123 on host n1 (SLURM job 456, array task 450_3), started 2025-06-01T10:00:00+00:00``."""
    slurm_part = []
    if holder.get("slurm_job_id"):
        slurm_part.append(f"SLURM job {holder['slurm_job_id']}")
    if holder.get("slurm_array_task"):
        slurm_part.append(f"array task {holder['slurm_array_task']}")
    where = f" ({', '.join(slurm_part)})" if slurm_part else ""
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{where}, "
        f"started {holder.get('started', 'at an unknown time')}"
    )


@dataclass(frozen=True)
class Verdict:
    """Whether a lock's holder still runs: ``live``, ``stale`` (gone) or ``unknown`` (cannot tell from here)."""

    state: str
    why: str


def _pid_alive(pid, started) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # ended, not yet reaped by its parent
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        pass  # exists, but not ours to look at
    now_started = _process_started(pid)
    # A pid is reused once its process is gone; the start time tells the holder from a newcomer.
    return started is None or now_started is None or abs(now_started - float(started)) < 1.0


def judge(holder: dict, me: dict | None = None) -> Verdict:
    """Is the job that took this lock still running? Asked of this host's processes, then of SLURM."""
    me = me or this_holder()
    host, pid, job = holder.get("host"), holder.get("pid"), holder.get("slurm_job_id")
    if not host:
        return Verdict(UNKNOWN, "the lock does not say which host took it")
    if host == me["host"]:
        if _pid_alive(pid, holder.get("pid_started")):
            return Verdict(LIVE, f"process {pid} is running on this host")
        return Verdict(STALE, f"process {pid} is no longer running on this host")
    # SLURM sets SLURM_RESTART_COUNT only in a job that was requeued (and counts up each time), so a
    # higher count than the lock's is a later instance of the same job: the one that locked has ended.
    restarts = int(me.get("slurm_restart_count") or 0), int(holder.get("slurm_restart_count") or 0)
    if job and job == me.get("slurm_job_id") and restarts[0] > restarts[1]:
        return Verdict(STALE, f"this is SLURM job {job} again, restarted after a requeue")
    if job and slurm.available():
        try:
            state = slurm.job_state(job)
        except slurm.SlurmError as e:
            return Verdict(UNKNOWN, f"SLURM could not say whether job {job} still runs ({e})")
        if state in ALIVE_SLURM_STATES:
            return Verdict(LIVE, f"SLURM job {job} is {state}")
        return Verdict(STALE, f"SLURM job {job} is {state or 'no longer known to SLURM'}")
    return Verdict(
        UNKNOWN,
        f"it was taken on another host ({host}) and "
        + (f"SLURM cannot be asked about job {job} here" if job else "by no SLURM job, so nothing here can check it"),
    )


def read_holder(folder) -> dict | None:
    """The lock's content; None when there is no lock, ``{}`` when it cannot be read."""
    try:
        text = lock_path(folder).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def inspect(folder) -> tuple[dict, Verdict] | None:
    """The lock of a folder and whether its holder runs; None when the folder has no lock."""
    holder = read_holder(folder)
    if holder is None:
        return None
    return holder, judge(holder)


def held_by(folder) -> str | None:
    """Who holds ``folder``'s lock, when that job may still run; None when it is free or the lock is stale."""
    return held_text(read_holder(folder), lock_path(folder))


def held_text(holder: dict | None, path, verdict: Verdict | None = None) -> str | None:
    """Who holds a lock whose content is ``holder`` (None: there is no lock), when that job may still run; None
    when it is free or stale. ``path``: the lock's name (a URL for a lock in a bucket: ``ddm.store.lock``);
    ``verdict``: the holder judged already (``judge``'s by default)."""
    if holder is None:
        return None
    verdict = judge(holder) if verdict is None else verdict
    if verdict.state == STALE:
        return None
    if not holder:
        return f"{path} is unreadable; delete it if no job runs there"
    if verdict.state == UNKNOWN:
        return f"{describe(holder)} ({verdict.why}; delete {path} if that job is dead)"
    return f"{describe(holder)} ({verdict.why})"


def _create(path: Path, holder: dict) -> bool:
    """Create the lock, whole, only if it does not exist; False when it does."""
    text = json.dumps(holder, indent=2, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.{holder['token']}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links on this file system: an exclusive create, then the content.
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_same(path: Path, holder: dict, me: dict) -> None:
    """Remove the stale lock ``holder``, unless meanwhile another job replaced it (then it stays).

    Moving it aside is atomic: of two jobs taking over the same stale lock, one moves it. Should the
    moved file be a new holder's lock, it is put back.
    """
    aside = path.with_name(f".{path.name}.{me['token']}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text())
    except (OSError, ValueError):
        moved = {}
    if moved != holder:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def refusal(folder, holder: dict, verdict: Verdict, what: str, path=None) -> Locked:
    """The error of a job that finds ``folder`` held: it names the holder and says what to do.

    ``path``: the lock's name in the message (a URL for a run in an object store); ``folder``'s lock.json by default.
    """
    path = lock_path(folder) if path is None else path
    command = f": `{holder['command']}`" if holder.get("command") else ""
    if not holder:
        return Locked(
            f"{what}: {path} exists but cannot be read, so another job may be writing {folder}. If no job "
            f"runs there (`ddm status`), delete {path} and run this again."
        )
    if verdict.state == LIVE:
        stop = []
        if holder.get("slurm_job_id"):
            stop.append(f"scancel {holder['slurm_job_id']}")
        stop.append(f"kill {holder.get('pid')} on {holder.get('host')}")
        return Locked(
            f"{what}: {folder} is in use by another job, {describe(holder)}{command} ({verdict.why}). Two jobs "
            f"must not write one folder: wait for it to finish (`ddm status` shows it), or stop it "
            f"({' or '.join(stop)}; a training job saves last.ckpt first) and run this again."
        )
    return Locked(
        f"{what}: {folder} is locked by {describe(holder)}{command}, and whether that job still runs cannot "
        f"be checked: {verdict.why}. If you know that job is dead, delete {path} and run this again."
    )


def acquire(folder, what: str) -> dict:
    """Take the lock of ``folder`` for this process, taking over a stale one; raise ``Locked`` if held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    me = this_holder()
    for _ in range(5):  # a lost race against another job taking over the same stale lock: look again
        if _create(path, me):
            return me
        holder = read_holder(folder)
        if holder is None:
            continue  # released meanwhile
        verdict = judge(holder, me) if holder else Verdict(UNKNOWN, "unreadable")
        if verdict.state != STALE:
            raise refusal(folder, holder, verdict, what)
        log.warning("%s: taking over the stale lock %s of %s: %s", what, path, describe(holder), verdict.why)
        _remove_if_same(path, holder, me)
    raise Locked(f"{what}: could not take {path}: other jobs keep taking it; run `ddm status` to see who holds it")


def release(folder, holder: dict) -> None:
    """Remove the lock if it is still this holder's (a job that lost it must not delete another's)."""
    current = read_holder(folder)
    if current is None:
        return
    if current.get("token") != holder.get("token"):
        log.warning("%s is now held by %s: leaving it in place", lock_path(folder), describe(current))
        return
    lock_path(folder).unlink(missing_ok=True)


@contextlib.contextmanager
def job_lock(folder, what: str) -> Iterator[dict | None]:
    """Hold ``folder``'s lock for the body (global rank 0 only; other ranks get None); released on any exit."""
    if not is_global_rank_zero():
        yield None
        return
    holder = acquire(folder, what)
    try:
        yield holder
    finally:
        release(folder, holder)


def check_free(folder, what: str) -> None:
    """Raise ``Locked`` when a job that may still run holds ``folder``: before deleting it (``redo=true``)."""
    found = inspect(folder)
    if found is not None and found[1].state != STALE:
        raise refusal(folder, found[0], found[1], what)
