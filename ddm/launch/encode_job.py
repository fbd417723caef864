"""Where one cluster's encode works: its lock, the folder it writes into, and the swap that puts it in place.

Each island may encode its own partition (``vae.clusters``), so two encodes can
run at once: of different clusters side by side, never two of one cluster. The
latents of cluster KK are written whole before anyone sees them::

    latents/cluster-KK/            the finished shard set (what the experts read)
    latents/cluster-KK.encode/     the encode job's own folder:
        lock.json                  held while an encode of KK runs (``ddm.launch.lock``, as the experts')
        verified.json              the partition's shards as checked (``ddm.data.verified``)
        partial/                   the shard set being written
        replaced/                  the previous set, for the moment between the two renames below

The lock cannot live in ``cluster-KK/``: that folder is replaced as a whole at
the end, so a lock inside it would go with it. An encode writes ``partial/``;
only when it is whole (its manifest written last) is the finished set, if any,
renamed aside and ``partial/`` renamed to ``cluster-KK/`` (one file system: each
rename is atomic). A killed encode therefore leaves either the earlier set, whole,
or none at all, never a folder that looks complete and is not; the next encode
of KK, holding the lock, clears what a killed one left in its job folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.launch.lock import acquire, release

log = logging.getLogger("ddm")


def job_folder(rd: RunDir, k: int) -> Path:
    """``latents/cluster-KK.encode/``: cluster ``k``'s encode job's lock, check record and unfinished output."""
    out = rd.latent(k)
    return out.with_name(f"{out.name}.encode")


def partial_folder(rd: RunDir, k: int) -> Path:
    return job_folder(rd, k) / "partial"


def selected_clusters(value: int | list[int] | None, k: int) -> list[int]:
    """The clusters ``vae.clusters`` names (None: all ``k``), sorted; an id outside 0..k-1 is refused."""
    if value is None:
        return list(range(k))
    ids = [value] if isinstance(value, int) else list(value)
    if not ids:
        raise BadInput(f"vae.clusters=[] names no cluster: give ids in 0..{k - 1}, or vae.clusters=null for all")
    bad = [i for i in ids if not 0 <= int(i) < k]
    if bad:
        raise BadInput(
            f"vae.clusters={value}: this run has no cluster {bad[0]}, its K={k} clusters are 0..{k - 1}; "
            f"give ids in that range, or vae.clusters=null for all"
        )
    return sorted({int(i) for i in ids})


@contextlib.contextmanager
def cluster_locks(rd: RunDir, clusters: list[int]) -> Iterator[None]:
    """Hold the encode lock of each of ``clusters`` for the body; ``Locked`` (naming the holder) if one is held.

    All are taken before any work, so an encode that would meet a held cluster later refuses at once.
    Every process takes them, not only global rank 0 as a training job does: encode is one process, and
    a second one started beside it (another rank by mistake) must refuse, not write the same folder.
    """
    with contextlib.ExitStack() as stack:
        for k in clusters:
            folder = job_folder(rd, k)
            holder = acquire(folder, f"encode cluster {k}")
            stack.callback(release, folder, holder)
            _clear_leftovers(rd, k)
        yield


def _clear_leftovers(rd: RunDir, k: int) -> None:
    """Remove what an encode of ``k`` killed mid-way left (the lock is held: no one else writes there)."""
    for name in ("partial", "replaced"):
        left = job_folder(rd, k) / name
        if left.exists():
            log.info("encode: removing %s, left by an encode of cluster %d that did not finish", left, k)
            shutil.rmtree(left)


@contextlib.contextmanager
def writing_cluster(rd: RunDir, k: int) -> Iterator[Path]:
    """Yield the folder to write cluster ``k``'s latents into; on success put it in place of ``latents/cluster-KK``.

    On an error the unfinished folder is removed and the finished set, if any, stays as it was.
    Call with the cluster's lock held (``cluster_locks``).
    """
    partial = partial_folder(rd, k)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    out, aside = rd.latent(k), job_folder(rd, k) / "replaced"
    if out.exists():
        os.rename(out, aside)  # only now that its replacement is whole
    os.rename(partial, out)
    if aside.exists():
        shutil.rmtree(aside)
