"""Units written by worker processes, their results handed back in unit order.

Each worker process receives the reader and the storage options once (at start) and then
only unit numbers and units; it writes the unit's shard itself and sends back its keys and
checksum, so the main process moves no image. Results are taken in unit order, with at most
a few units per worker in flight, so the first error met is the first in stored order,
whatever the number of workers, and memory stays bounded.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from ddm.cores import available_cores
from ddm.data.ingest.unit import StoreOptions, UnitResult, write_unit
from ddm.data.sources import UnitReader
from ddm.errors import BadInput

log = logging.getLogger("ddm")

IN_FLIGHT_PER_WORKER = 2  # units queued per worker: enough to keep it busy, few enough to bound memory


def resolve_workers(workers: int | None, key: str = "data.workers") -> int:
    """``workers`` as a count: None is every available core; 0 and 1 mean the main process alone."""
    if workers is None:
        return available_cores()
    if int(workers) < 0:
        raise BadInput(f"{key}={workers}: give a number of worker processes (0: none), or null for every core")
    return int(workers)


# Set in each worker process by _start: what every unit it writes shares.
_job: tuple[Path, UnitReader, StoreOptions] | None = None


def _start(folder: Path, reader: UnitReader, options: StoreOptions) -> None:
    global _job
    _job = (folder, reader, options)


def _write(index: int, unit) -> UnitResult:
    folder, reader, options = _job
    return write_unit(folder, index, unit, reader, options)


def _context():
    # fork starts a worker in milliseconds and shares the source's listing; the workers touch no device
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def write_units(
    folder: Path,
    units: Iterable[tuple[int, object]],
    reader: UnitReader,
    options: StoreOptions,
    workers: int,
    limit: int | None = None,
) -> Iterator[UnitResult]:
    """Write every ``(index, unit)`` as its shard in ``folder``; yield the results in the order given.

    ``limit``: stop after that many samples in all (a streamed source's ``data.limit``): the units are
    then written one after another here, each knowing how many samples it may still keep.
    """
    units = list(units)
    if limit is not None:
        remaining = int(limit)
        for index, unit in units:
            if remaining <= 0:
                return
            result = write_unit(folder, index, unit, reader, options, cap=remaining)
            remaining -= len(result.keys)
            yield result
        return
    workers = min(workers, len(units))
    if workers <= 1:
        for index, unit in units:
            yield write_unit(folder, index, unit, reader, options)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start, initargs=(folder, reader, options))
    pending: deque[Future] = deque()
    todo = iter(units)
    try:
        for index, unit in todo:
            pending.append(pool.submit(_write, index, unit))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # on an error (or the caller stopping early) the units not started are dropped, the ones running finish
        pool.shutdown(wait=True, cancel_futures=True)
