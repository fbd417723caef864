"""Sampling in parts: P jobs each draw a range of a run's sample indices, and a last step joins them.

Part ``j`` of ``P`` draws whole batches: of the ``ceil(N / B)`` batches of ``B = sample.batch_size``
images (the grid first, then the extra samples), batches ``[j*nb//P, (j+1)*nb//P)``. Every draw of sample i
comes from (seed, i) alone (``ddm.sampling.indexed``) and each batch holds the rows a one-job run's batch
holds, so the joined images equal one job's, bit for bit on one kind of device. A part writes::

    samples/parts/part-JJJJ-of-PPPP.npz    images and labels of its range
    samples/parts/part-JJJJ-of-PPPP.json   written last, so its presence marks the part done: the settings and
                                           models it sampled with, its range, the plan every part shares
                                           (total, grid, prompts), its usage and the npz's sha256

The join (``ddm sample sample.parts=P`` with no ``sample.part``) loads no network: it checks that every part
is there, of the same settings, models and plan, that the ranges tile the run, and that each npz is the one
its record names; it names any part that is missing or damaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddm.errors import BadInput, MissingInput, some_of
from ddm.io import atomic_path, load_npz, read_json, sha256_file, write_json

PARTS = "parts"


def check_parts(parts, part) -> tuple[int, int | None]:
    """``(sample.parts, sample.part)`` checked: parts >= 1, part null or one of 0..parts-1."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise BadInput(f"sample.parts={parts!r}: give the number of jobs that draw the samples (1: this job alone)")
    if part is not None and (isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < parts):
        raise BadInput(f"sample.part={part!r} is not one of the {parts} parts: give 0..{parts - 1}, or null")
    return parts, part


def part_range(total: int, batch_size: int, parts: int, part: int) -> range:
    """The sample indices part ``part`` of ``parts`` draws: whole batches of ``batch_size``, contiguous."""
    batches = math.ceil(int(total) / int(batch_size))
    lo, hi = part * batches // parts, (part + 1) * batches // parts
    return range(min(lo * batch_size, total), min(hi * batch_size, total))


def part_files(folder: Path, part: int, parts: int) -> tuple[Path, Path]:
    """``(npz, json)`` of part ``part`` of ``parts`` under the samples folder."""
    stem = Path(folder) / PARTS / f"part-{part:04d}-of-{parts:04d}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def part_command(parts: int, part: int | str = "J") -> str:
    return f"ddm sample sample.parts={parts} sample.part={part}"


def write_part(folder: Path, part: int, parts: int, images: np.ndarray, labels: np.ndarray, record: dict) -> dict:
    """Write part ``part``'s images, then its record (the npz's checksum in it); return the record."""
    npz, js = part_files(folder, part, parts)
    npz.parent.mkdir(parents=True, exist_ok=True)
    js.unlink(missing_ok=True)  # a part being rewritten is not done until its new record is there
    with atomic_path(npz) as tmp:
        np.savez(tmp, images=images, labels=labels)
    record = dict(record, part=part, parts=parts, npz_sha256=sha256_file(npz))
    write_json(js, record)
    return record


def part_done(folder: Path, part: int, parts: int, expect: dict) -> dict | None:
    """Part ``part``'s record when it was made with ``expect`` (its settings, models, plan), else None."""
    _, js = part_files(folder, part, parts)
    if not js.exists():
        return None
    record = read_json(js)
    return record if all(record.get(k) == v for k, v in expect.items()) else None


def join_parts(folder: Path, parts: int, expect: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``(images, labels, part records)`` of every part, in index order; a clear error names what is wrong.

    ``expect``: what every part's record must hold (settings, models, plan); a part made otherwise is
    named as stale, a missing one as not done, a damaged npz as damaged.
    """
    records, missing = [], []
    for j in range(parts):
        _, js = part_files(folder, j, parts)
        if not js.exists():
            missing.append(j)
            continue
        records.append(read_json(js))
    if missing:
        raise MissingInput(
            f"sample: parts {some_of(missing)} of sample.parts={parts} are not done (no "
            f"{part_files(folder, missing[0], parts)[1]}): run `{part_command(parts)}` for each (or "
            f"`ddm submit submit.stage=sample sample.parts={parts}`), then `ddm sample sample.parts={parts}` joins them"
        )
    for j, record in enumerate(records):
        stale = sorted(k for k, v in expect.items() if record.get(k) != v)
        if stale:
            raise BadInput(
                f"sample: {part_files(folder, j, parts)[1]} was drawn with other {', '.join(stale)} than this "
                f"join asks for: run `{part_command(parts, j)} redo=true` with this join's settings"
            )
    stop = 0
    for j, record in enumerate(records):
        lo, hi = int(record["range"][0]), int(record["range"][1])
        if lo != stop:
            raise BadInput(
                f"sample: part {j} of {parts} holds samples {lo}..{hi - 1} but the parts before it end at "
                f"{stop - 1}: the parts were drawn with another sample.batch_size; rerun them with one batch size"
            )
        stop = hi
    total = int(expect["plan"]["total"])
    if stop != total:
        raise BadInput(f"sample: the {parts} parts hold {stop} samples, not the run's {total}: rerun them")
    images, labels = [], []
    for j, record in enumerate(records):
        npz, _ = part_files(folder, j, parts)
        redo = f"rerun `{part_command(parts, j)} redo=true`"
        if not npz.exists() or sha256_file(npz) != record["npz_sha256"]:
            raise BadInput(f"sample: {npz} is missing or damaged (not the file its record names): {redo}")
        arrays = load_npz(npz, ("images", "labels"))
        n = int(record["range"][1]) - int(record["range"][0])
        if len(arrays["images"]) != n or len(arrays["labels"]) != n:
            raise BadInput(f"sample: {npz} holds {len(arrays['images'])} images, not its range's {n}: {redo}")
        if n:  # more parts than batches leaves a part with none
            images.append(arrays["images"])
            labels.append(arrays["labels"])
    return np.concatenate(images), np.concatenate(labels), records
