"""The job lock of a folder in an object store: ``<folder>/lock.json`` created only if absent.

The same holder, staleness rules and messages as a local folder's lock (``ddm.launch.lock``): a job creates
the lock object with the store's conditional put, so of two jobs on one expert in two islands exactly one gets
it; the other is refused, naming the first. A stale lock (its holder's process gone on this host, its SLURM job
requeued or ended) is removed and created again with the conditional put, so of two jobs taking it over one
wins. Removing it is a read, a comparison of its token, then a delete: two takers may both delete, but only one
creates. On a store with no conditional put the lock is a best effort: an existence check, then a put
(``ConditionalPutUnsupported`` is logged once).
"""

from __future__ import annotations

import json
import logging

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


def held_by(store: ObjectStore, folder: str) -> str | None:
    """Who holds ``folder``'s lock in the bucket, when that job may still run (``ddm.launch.lock.held_by``)."""
    return held_text(read_holder(store, folder), store.url_of(lock_key(folder)))


def _create(store: ObjectStore, key: str, data: bytes) -> bool:
    try:
        return store.create(key, data)
    except ConditionalPutUnsupported as error:
        log.warning("%s; taking the lock by a check, then a put (a best effort)", error)
        if store.exists(key):
            return False
        store.put_bytes(data, key)
        return True


def acquire(store: ObjectStore, folder: str, what: str) -> dict:
    """Take ``folder``'s lock in ``store`` for this process, taking over a stale one; raise ``Locked`` if held."""
    key, me = lock_key(folder), this_holder()
    data = (json.dumps(me, indent=2, sort_keys=True) + "\n").encode()
    for _ in range(5):  # lost a race against another job taking over the same stale lock: look again
        if _create(store, key, data):
            return me
        holder = read_holder(store, folder)
        if holder is None:
            continue  # released meanwhile
        verdict = judge(holder, me) if holder else Verdict(UNKNOWN, "unreadable")
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
