"""Embeddings written by separate jobs: ``embed.parts`` contiguous ranges of data shards, merged when all are there.

Part ``j`` of ``N`` embeds data shards ``part_units(num_shards, N, j)`` (the ranges ``prepare``'s parts use) into
the usual ``emb-NNNNNN.npy`` / ``keys-NNNNNN.txt``. Before it writes any, it records in
``parts/part-JJJJ-of-NNNN.json`` which encoder, seed and data its range is embedded with (the fingerprint
``encoder.json`` holds for a whole run), and which shards the range is. The merge (``ddm embed embed.parts=N``,
no ``embed.part``) computes nothing: it checks that every part recorded this merge's settings and that every
shard's files are complete, then writes the manifest and ``encoder.json`` and removes ``parts/``.

Which files may be kept when a job starts: the files of shard ``i`` were written under the newest record
covering ``i`` (``encoder.json`` is the oldest: the merge and a one-job run, which write it, remove
``parts/``). A part keeps them when that record names its encoder and data (or data that only grew since);
otherwise it deletes them, and only them: never a shard outside its own range, which another part may be
writing. Records are ordered by ``seq``, one more than any record there when it was written, not by clocks
that differ between machines.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ddm.embed import embedding_file, keys_file
from ddm.errors import BadInput
from ddm.io import read_json, write_json

log = logging.getLogger("ddm")

PARTS = "parts"
FINGERPRINT = "encoder.json"
_RECORD = re.compile(r"part-(\d+)-of-(\d+)\.json")


def check_parts(parts: int, part: int | None) -> None:
    if int(parts) < 1:
        raise BadInput(f"embed.parts={parts}: give the number of jobs that embed the data (1: this job alone)")
    if part is not None and not 0 <= int(part) < int(parts):
        raise BadInput(f"embed.part={part} is not one of the {parts} parts: give 0..{int(parts) - 1}, or null")


def record_path(folder: Path, part: int, parts: int) -> Path:
    return Path(folder) / PARTS / f"part-{part:04d}-of-{parts:04d}.json"


def verified_path(folder: Path, part: int, parts: int) -> Path:
    """Part ``part``'s record of the data shards it checked: its own file, so parts never write one together."""
    return Path(folder) / PARTS / f"verified-part-{part:04d}-of-{parts:04d}.json"


def merge_command(parts: int) -> str:
    return f"ddm embed embed.parts={parts}"


def same_or_grown(recorded: dict, now: dict) -> bool:
    """The same encoder and seed, and the recorded data shards are the first of the current ones (``ddm extend``)."""
    old, new = recorded.get("data_shards") or [], now["data_shards"]
    same_encoder = {k: v for k, v in recorded.items() if k != "data_shards"} == {
        k: v for k, v in now.items() if k != "data_shards"
    }
    return same_encoder and new[: len(old)] == old


def _records(folder: Path) -> list[dict]:
    """Every part record under ``folder/parts`` (of any ``embed.parts``)."""
    found = []
    for path in sorted((Path(folder) / PARTS).glob("part-*-of-*.json")):
        if _RECORD.fullmatch(path.name):
            found.append(read_json(path))
    return found


def stale_shards(folder: Path, fingerprint: dict, span: range) -> list[int]:
    """The shards of ``span`` whose files, if any, were written under another encoder or for other data."""
    vouchers = [(r["seq"], r["start"], r["stop"], r["fingerprint"]) for r in _records(folder)]
    path = Path(folder) / FINGERPRINT
    if path.exists():
        recorded = read_json(path)
        vouchers.append((0, 0, len(recorded.get("data_shards") or []), recorded))
    stale = []
    for i in span:
        covering = [(seq, fp) for seq, start, stop, fp in vouchers if start <= i < stop]
        newest = max((seq for seq, _ in covering), default=None)
        if any(seq == newest and not same_or_grown(fp, fingerprint) for seq, fp in covering):
            stale.append(i)
    return stale


def clear_shard_files(folder: Path, indices: list[int] | None = None) -> None:
    """Delete the per-shard files of ``indices`` (None: of every shard)."""
    if indices is None:
        paths = list(folder.glob("emb-*.npy")) + list(folder.glob("keys-*.txt"))
    else:
        paths = [folder / name for i in indices for name in (embedding_file(i), keys_file(i))]
    for path in paths:
        path.unlink(missing_ok=True)


def reset_all(folder: Path, fingerprint: dict, redo: bool) -> None:
    """For a run by one job: drop every per-shard file if any was written by another encoder or for other
    data (or ``redo``), then record ours. Data that only grew by shards appended after the old ones
    (``ddm extend``) keeps the old shards' files: only the new shards are embedded."""
    if redo:
        clear_shard_files(folder)
    elif stale_shards(folder, fingerprint, range(len(fingerprint["data_shards"]))):
        log.info(f"embed: encoder or data changed since {folder} was written; recomputing every shard")
        clear_shard_files(folder)
    write_fingerprint(folder, fingerprint)


def reset_part(folder: Path, fingerprint: dict, span: range, redo: bool) -> None:
    """For a part: drop the files of its own shards that another encoder or other data made (all of them with
    ``redo``), never another part's, which may be being written."""
    stale = list(span) if redo else stale_shards(folder, fingerprint, span)
    if stale and not redo:
        log.info(f"embed: {len(stale)} shards of this part were embedded with other settings or data; recomputing")
    clear_shard_files(folder, stale)


def write_record(folder: Path, part: int, parts: int, span: range, fingerprint: dict, about: dict) -> Path:
    """Record that part ``part``'s shards are (from now on) embedded under ``fingerprint``; ``about``: what the
    merge needs besides (the encoder's name and dim, the settings the embeddings depend on)."""
    seq = 1 + max((r["seq"] for r in _records(folder)), default=0)
    path = record_path(folder, part, parts)
    write_json(
        path, dict(about, part=part, parts=parts, start=span.start, stop=span.stop, seq=seq, fingerprint=fingerprint)
    )
    return path


def write_fingerprint(folder: Path, fingerprint: dict) -> None:
    """``encoder.json`` for every shard, then no part record any more: it vouches for the whole folder alone."""
    write_json(Path(folder) / FINGERPRINT, fingerprint)
    if (Path(folder) / PARTS).is_dir():
        shutil.rmtree(Path(folder) / PARTS)


def merge_records(folder: Path, parts: int, spans: list[range], data_shards: list[str], made_with: dict) -> dict:
    """``{part: record}`` of the parts whose record is there for these spans and this data.

    A record made with other settings (``made_with``: the embed settings the embeddings depend on, and the
    seed), or naming another encoder than the parts before it, is refused; a missing or outdated one is left
    out: that part is not done.
    """
    found, spec = {}, None
    for j, span in enumerate(spans):
        path = record_path(folder, j, parts)
        if not path.exists():
            continue
        record = read_json(path)
        differ = _differ(record.get("made_with") or {}, made_with)
        if differ:
            raise BadInput(
                f"{path} was written with other settings than this merge ({'; '.join(differ)}): rerun part {j} "
                f"with the merge's settings, or merge with the ones it used"
            )
        fp = record["fingerprint"]
        if (record["start"], record["stop"]) != (span.start, span.stop) or fp["data_shards"] != data_shards:
            continue  # written for other data (prepared again, or grown since): the part runs again
        if spec is not None and fp["encoder"] != spec:
            raise BadInput(
                f"{path} names another encoder than the parts before it (its weights changed in between?): rerun "
                f"part {j} with redo=true"
            )
        spec = fp["encoder"]
        found[j] = record
    return found


def _differ(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        there, now = recorded.get(key), wanted.get(key)
        if isinstance(there, dict) and isinstance(now, dict):
            out += _differ(there, now, f"{prefix}{key}.")
        elif there != now:
            out.append(f"{prefix}{key} {there!r} there, {now!r} now")
    return out
