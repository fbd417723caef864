"""The job lock of a folder in an object store: ``<folder>/lock.json`` created only if absent.

The same holder, staleness rules and messages as a local folder's lock (``ddm.launch.lock``): a job creates
the lock object with the store's conditional put, so of two jobs on one expert in two islands exactly one gets
it; the other is refused, naming the first. A stale lock (its holder's process gone on this host, its SLURM job
requeued or ended) is removed and created again with the conditional put, so of two jobs taking it over one
wins. Removing it is a read, a comparison of its token, then a delete: two takers may both delete, but only one
creates. On a store with no conditional put the lock is a best effort: an existence check, then a put
(``ConditionalPutUnsupported`` is logged once).

Islands share no scheduler: a job on another island's node that died without a word (a spot node taken back)
cannot be judged by its pid or its SLURM job from here. So a bucket's lock is also a lease: its job renews it
(``Lease``, a thread writing ``renewed`` every ``lease_s / 6`` seconds), and a lock that nothing here can judge
and that was not renewed for ``lease_s`` seconds is stale (``store.lease_s``, 1800 by default; 0: no lease).
A job whose lock was taken over meanwhile (it stopped for longer than the lease) finds that out at its next
renewal and pushes nothing (``Lease.check``).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from ddm.errors import Locked, Unusable
from ddm.launch.lock import LOCK_NAME, STALE, UNKNOWN, Verdict, describe, held_text, judge, refusal, this_holder
from ddm.store.objects import ConditionalPutUnsupported, ObjectStore

log = logging.getLogger("ddm")


def lock_key(folder: str) -> str:
    return f"{str(folder).strip('/')}/{LOCK_NAME}"


def read_holder(store: ObjectStore, folder: str) -> dict | None:
    """The lock's content; None when there is none, ``{}`` when it cannot be read."""
    try:
        holder = store.read_json(lock_key(folder))
    except FileNotFoundError:
        return None
    except Unusable:
        return {}
    return holder if isinstance(holder, dict) else {}


def judge_lease(holder: dict, me: dict | None = None, now: float | None = None) -> Verdict:
    """``ddm.launch.lock.judge``, and a lock that cannot be judged from here is stale once its lease ran out."""
    verdict = judge(holder, me)
    lease, renewed = holder.get("lease_s"), holder.get("renewed")
    if verdict.state != UNKNOWN or not isinstance(lease, (int, float)) or lease <= 0:
        return verdict
    if not isinstance(renewed, (int, float)):
        return verdict
    age = (time.time() if now is None else now) - float(renewed)
    if age > lease:
        return Verdict(STALE, f"its job has not renewed it for {age:.0f} s (its lease is {lease:.0f} s)")
    return Verdict(UNKNOWN, f"{verdict.why}; its lease was renewed {age:.0f} s ago")


def held_by(store: ObjectStore, folder: str) -> str | None:
    """Who holds ``folder``'s lock in the bucket, when that job may still run (``ddm.launch.lock.held_by``)."""
    holder = read_holder(store, folder)
    verdict = judge_lease(holder) if holder else None
    return held_text(holder, store.url_of(lock_key(folder)), verdict)


def _create(store: ObjectStore, key: str, data: bytes) -> bool:
    try:
        return store.create(key, data)
    except ConditionalPutUnsupported as error:
        log.warning("%s; taking the lock by a check, then a put (a best effort)", error)
        if store.exists(key):
            return False
        store.put_bytes(data, key)
        return True


def acquire(store: ObjectStore, folder: str, what: str, lease_s: float = 0) -> dict:
    """Take ``folder``'s lock in ``store`` for this process, taking over a stale one; raise ``Locked`` if held.
    ``lease_s`` > 0: the lock is a lease its job renews (``Lease``)."""
    key, me = lock_key(folder), this_holder()
    if lease_s > 0:
        me.update(lease_s=float(lease_s), renewed=time.time())
    data = (json.dumps(me, indent=2, sort_keys=True) + "\n").encode()
    for _ in range(5):  # lost a race against another job taking over the same stale lock: look again
        if _create(store, key, data):
            return me
        holder = read_holder(store, folder)
        if holder is None:
            continue  # released meanwhile
        verdict = judge_lease(holder, me) if holder else Verdict(UNKNOWN, "unreadable")
        if verdict.state != STALE:
            raise refusal(store.url_of(folder), holder, verdict, what, path=store.url_of(key))
        log.warning(
            "%s: taking over the stale lock %s of %s: %s", what, store.url_of(key), describe(holder), verdict.why
        )
        if read_holder(store, folder) == holder:
            store.remove(key)
    raise Locked(f"{what}: could not take {store.url_of(key)}: other jobs keep taking it; run `ddm status`")


def release(store: ObjectStore, folder: str, holder: dict) -> None:
    """Remove the lock if it is still this holder's (a job that lost it must not delete another's)."""
    current = read_holder(store, folder)
    if current is None:
        return
    if current.get("token") != holder.get("token"):
        log.warning("%s is now held by %s: leaving it in place", store.url_of(lock_key(folder)), describe(current))
        return
    store.remove(lock_key(folder))


class Lease:
    """Renews a held bucket lock every ``lease_s / 6`` seconds in a thread, while ``with Lease(...)`` runs; a
    renewal that finds the lock another job's marks the lease lost (``check`` then raises ``Locked``)."""

    def __init__(self, store: ObjectStore, folder: str, holder: dict):
        self.store, self.folder, self.holder = store, folder, holder
        self.every_s = float(holder.get("lease_s") or 0) / 6
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="ddm-lock-lease", daemon=True)

    def __enter__(self) -> Lease:
        if self.every_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except Exception as error:  # a failed renewal is tried again; the lease is long enough for several
                log.warning("could not renew %s: %s", self.store.url_of(lock_key(self.folder)), error)
            if self.lost:
                return

    def renew(self) -> None:
        """Write the lock again with ``renewed`` now, if it is still this job's."""
        current = read_holder(self.store, self.folder)
        if not current or current.get("token") != self.holder.get("token"):
            self.lost = describe(current) if current else "nobody (it was removed)"
            log.error("%s is now held by %s: this job lost it", self.store.url_of(lock_key(self.folder)), self.lost)
            return
        self.holder = dict(self.holder, renewed=time.time())
        self.store.put_json(self.holder, lock_key(self.folder))

    def check(self, what: str) -> None:
        """Raise ``Locked`` when another job took the lock over while this one ran (it must not push)."""
        if self.lost:
            raise Locked(
                f"{what}: {self.store.url_of(lock_key(self.folder))} was taken over by {self.lost} while this job "
                f"ran (it stopped for longer than its lease of {self.holder.get('lease_s')} s): nothing was "
                f"pushed; `ddm status` shows the job that holds it now"
            )
