"""A source written by separate jobs: ``data.parts`` contiguous ranges of units, merged when all are there.

Part ``j`` of ``N`` writes units ``[j*U//N, (j+1)*U//N)`` (U units in all) and then, last,
``data/parts/part-JJJJ-of-NNNN.json``: the settings it was made with, a digest of the whole
list of units (which files, in which order), and each unit's shard entry, keys and skipped
images. A part whose record is there is done. The merge (``ddm prepare data.parts=N`` with no
``data.part``) checks that every part is there, was made with the same settings from the same
listing of the source, and that every shard it names is on disk at its recorded size; it reads
no image. The merged manifest equals what one job writes: the units, and so the shards, do not
depend on how many jobs wrote them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ddm.data.ingest.unit import UnitResult
from ddm.errors import BadInput, MissingInput, some_of
from ddm.io import StringsDigest, read_json, sha256_strings, write_json

PARTS = "parts"


def part_path(folder: Path, part: int, parts: int) -> Path:
    return Path(folder) / PARTS / f"part-{part:04d}-of-{parts:04d}.json"


def part_units(num_units: int, parts: int, part: int) -> range:
    """The units part ``part`` of ``parts`` writes: a contiguous range, the ranges covering every unit once."""
    return range(part * num_units // parts, (part + 1) * num_units // parts)


def units_digest(units: Iterable) -> str:
    """Names the list of units (which items, in which order): parts of one listing of the source agree on it."""
    return sha256_strings(json.dumps(unit, separators=(",", ":")) for unit in units)


def check_parts(parts: int, part: int | None, streamed_limit: bool) -> None:
    if int(parts) < 1:
        raise BadInput(f"data.parts={parts}: give the number of jobs that write data/ (1: this job alone)")
    if part is not None and not 0 <= int(part) < int(parts):
        raise BadInput(f"data.part={part} is not one of the {parts} parts: give 0..{int(parts) - 1}, or null")
    if streamed_limit and int(parts) > 1:
        raise BadInput(
            "data.limit on webdataset shards keeps the first samples in shard order, which one job alone can "
            "count: prepare with data.parts=1, or without data.limit"
        )


def write_part(folder: Path, part: int, parts: int, about: dict, results: list[UnitResult]) -> Path:
    """Record part ``part``'s results, after its shards: the record is what marks the part done."""
    path = part_path(folder, part, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(about, part=part, parts=parts, units=[r.as_dict() for r in results]))
    return path


def part_done(folder: Path, part: int, parts: int, about: dict) -> bool:
    """Whether part ``part`` was written already, with these settings from this listing of the source."""
    path = part_path(folder, part, parts)
    if not path.exists():
        return False
    record = read_json(path)
    return all(record.get(k) == v for k, v in about.items())


@dataclass
class Merged:
    """The parts' results, in unit order."""

    shards: list[dict] = field(default_factory=list)
    num_samples: int = 0
    keys: StringsDigest = field(default_factory=StringsDigest)
    skipped: list[dict] = field(default_factory=list)
    passed_through: int = 0

    def add(self, result: UnitResult) -> None:
        if result.shard is not None:
            self.shards.append(result.shard)
            self.num_samples += result.shard["num_samples"]
        self.keys.update(result.keys)
        self.skipped += result.skipped
        self.passed_through += result.passed_through


def merge_parts(folder: Path, parts: int, num_units: int, about: dict) -> Merged:
    """Every part's results in unit order, checked to belong together and to be on disk; reads no image."""
    folder = Path(folder)
    missing = [j for j in range(parts) if not part_path(folder, j, parts).exists()]
    if missing:
        shown = some_of(missing)
        raise MissingInput(
            f"prepare: parts {shown} of data.parts={parts} are not done (no {part_path(folder, missing[0], parts)}): "
            f"run `ddm prepare data.parts={parts} data.part=J` for each (or `ddm submit submit.stage=prepare`), then "
            f"this command again to merge"
        )
    merged = Merged()
    for j in range(parts):
        path = part_path(folder, j, parts)
        record = read_json(path)
        differ = sorted(k for k, v in about.items() if record.get(k) != v)
        if differ:
            raise BadInput(
                f"{path} was written with other {', '.join(differ)} than this merge (another data config, seed or "
                f"listing of the source): rerun that part with redo=true, or merge with the settings it used"
            )
        indices = [u["index"] for u in record.get("units", [])]
        if indices != list(part_units(num_units, parts, j)):
            raise BadInput(f"{path} does not cover units {part_units(num_units, parts, j)}: rerun it with redo=true")
        for unit in record["units"]:
            result = UnitResult(**unit)
            if result.shard is not None:
                _check_on_disk(folder, result.shard, path)
            merged.add(result)
    return merged


def _check_on_disk(folder: Path, shard: dict, record: Path) -> None:
    path = folder / shard["path"]
    if not path.is_file():
        raise MissingInput(f"{path}, written by the part recorded in {record}, is missing: rerun that part")
    if path.stat().st_size != shard["size"]:
        raise BadInput(
            f"{path} is {path.stat().st_size} bytes but {record} recorded {shard['size']}: it was changed or cut "
            f"since; rerun that part with redo=true"
        )
