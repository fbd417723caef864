"""Writing a source into shards at scale: units read in worker processes, and in parts by separate jobs.

A source (``ddm.data.sources.open_source``) is split into units fixed by the source, the seed
and ``data.shard_size`` alone; unit ``i`` becomes ``shard-<i>.tar``. So the shards are the same
bytes whoever writes them:

- ``unit.write_unit`` reads, fits and encodes one unit and writes its shard (temporary name,
  renamed when whole);
- ``workers.write_units`` runs units in worker processes and hands back their results in unit
  order, so the main process only collects keys and checksums;
- ``parts`` splits the units into ``data.parts`` contiguous ranges that separate jobs (array
  tasks, other machines) write, each recording its results in ``parts/part-J-of-N.json``, and
  merges the records into the manifest once every part is there.
"""

from ddm.data.ingest.parts import PARTS, Merged, merge_parts, part_path, part_units, write_part
from ddm.data.ingest.unit import StoreOptions, UnitResult, shard_name, write_unit
from ddm.data.ingest.workers import resolve_workers, write_units

__all__ = [
    "PARTS",
    "Merged",
    "StoreOptions",
    "UnitResult",
    "merge_parts",
    "part_path",
    "part_units",
    "resolve_workers",
    "shard_name",
    "write_part",
    "write_unit",
    "write_units",
]
