"""Appending a prepared shard set to a run's ``data/``: the first step of growing a run (``ddm extend``).

The new shards are copied after the old ones (``shard-NNNNNN.tar`` numbering
goes on), each checked against the checksum its own manifest recorded, and
``data/manifest.json`` is written again, last, with the new count, the
``keys_sha256`` of every key in stored order and an ``extensions`` entry
naming what was added. The old shards are not touched, so everything made from
them (their embeddings, the partitions of clusters that get no new samples)
stays valid.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from ddm.data.shards import MANIFEST, iter_shard, shard_paths, verify
from ddm.errors import BadInput
from ddm.io import atomic_path, sha256_file, sha256_strings, write_json

# What must agree between the run's data and the new images for one ensemble to serve both.
SAME_FIELDS = ("image_size", "channels", "num_classes", "class_names")


def shard_keys(folder: Path, manifest: dict) -> list[str]:
    """Every key of a shard set in stored order."""
    return [sample["key"] for path in shard_paths(folder, manifest) for sample in iter_shard(path)]


def check_new_images(new: dict, data: dict, where: Path, run_keys) -> None:
    """Refuse new images that one ensemble cannot serve beside the run's, or that the run already holds."""
    for field in SAME_FIELDS:
        if new.get(field) != data.get(field):
            raise BadInput(
                f"the new images in {where} have {field}={new.get(field)!r}, the run's data {data.get(field)!r}: "
                f"prepare them with the run's data settings (data.image_size, data.channels, data.num_classes, "
                f"data.class_names) so the experts and the router can take them"
            )
    if new["keys_sha256"] == data["keys_sha256"]:
        raise BadInput(f"{where} is the run's own data: extend the run with images it does not hold yet")
    held = set(run_keys)
    again = [key for key in new["keys"] if key in held]
    if again:
        raise BadInput(
            f"{len(again)} of the {len(new['keys'])} new images in {where} are already in the run (e.g. {again[0]!r}): "
            f"prepare only images the run does not hold (data.classes or another source), once each"
        )


def read_new_images(folder: Path) -> dict:
    """The new shard set's manifest, every shard checked against its checksum, with its ``keys`` added."""
    manifest = verify(folder)
    keys = shard_keys(folder, manifest)
    if sha256_strings(keys) != manifest.get("keys_sha256"):
        raise BadInput(
            f"the shards in {folder} do not hold the keys their manifest's keys_sha256 says: "
            f"prepare the new images again (`ddm prepare redo=true`)"
        )
    return dict(manifest, keys=keys)


def append_shards(data_dir: Path, data: dict, new_dir: Path, new: dict, run_keys: list[str], **about) -> dict:
    """Copy the new shard set after ``data_dir``'s shards; write and return the new data manifest.

    ``run_keys``: the run's keys in stored order (with the new keys, the new ``keys_sha256``);
    ``about``: more fields of the extension entry.
    """
    entries = list(data["shards"])
    taken = {e["path"] for e in entries}
    # shard numbers after the run's own (prepare leaves a number unused where every image of a unit was skipped)
    names = (n for n in (f"shard-{j:06d}.tar" for j in itertools.count(len(entries))) if n not in taken)
    added = []
    for entry, source in zip(new["shards"], shard_paths(new_dir, new)):
        name = next(names)
        with atomic_path(data_dir / name) as tmp:
            shutil.copyfile(source, tmp)
            if sha256_file(tmp) != entry["sha256"]:
                raise BadInput(f"{source} changed while it was copied into {data_dir}: extend the run again")
        entries.append(dict(entry, path=name))
        added.append(name)
    extension = dict(
        source=str(new_dir),
        num_samples=int(new["num_samples"]),
        keys_sha256=new["keys_sha256"],
        shards=added,
        classes=new.get("classes"),
        **about,
    )
    manifest = dict(
        data,
        shards=entries,
        num_samples=int(data["num_samples"]) + int(new["num_samples"]),
        keys_sha256=sha256_strings([*run_keys, *new["keys"]]),
        extensions=[*(data.get("extensions") or []), extension],
    )
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def appended(data: dict, new: dict) -> dict | None:
    """The extension entry of ``data`` that added ``new`` (by its keys_sha256), or None."""
    for entry in data.get("extensions") or []:
        if entry["keys_sha256"] == new["keys_sha256"]:
            return entry
    return None


def new_shards_manifest(data: dict, entry: dict) -> dict:
    """``data``'s manifest restricted to the shards one extension added (to read only the new samples)."""
    names = set(entry["shards"])
    return dict(data, shards=[s for s in data["shards"] if s["path"] in names], num_samples=entry["num_samples"])


def load_new(folder) -> dict:
    """``read_new_images`` on a folder given by the user, with a clear error when it is no shard set."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise BadInput(
            f"extend.shards={folder} holds no manifest.json: give the data/ folder of a prepared shard set, e.g. "
            f"`ddm prepare name=new data=... data.classes=[...]` then extend.shards=<runs>/new/data"
        )
    return read_new_images(folder)
