"""Folders of a run moved between a bucket and a local working copy, each with the index that makes it trustworthy.

A job works on local disk and exchanges whole folders with the bucket:

- ``push_folder(store, local_root, folder)`` uploads the files under ``local_root/folder`` that the bucket does not
  already hold (by sha256), then writes ``folder/.ddm-index.json`` last: every file's sha256 and size. A folder
  whose index is missing or lists a file that is not there was not pushed whole, and is treated as absent.
- ``pull_folder(store, local_root, folder)`` reads the index of ``folder`` (and of every folder under it that has
  one), downloads the files the local copy lacks or holds in another version, checks each against the index's
  sha256 (naming the object's URL when it does not match), and leaves files of the local copy it does not list
  alone.

The index is the folder's own record of what it holds, so an object damaged or replaced on its way between
islands is refused, not only a truncated download. Files whose name starts with ``.``, that live under ``SKIPPED``
folders (checkpoints, logs: the job's local state) or that are a job's log (``*.out``: SLURM's and the local
launcher's, still being written while the job pushes, so their sha256 would not hold) are not pushed by
``push_folder``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ddm.errors import MissingInput, Unusable
from ddm.io import sha256_file
from ddm.store.objects import ObjectStore

INDEX = ".ddm-index.json"
SKIPPED = ("checkpoints", "logs", "wandb", "hydra")  # a job's local state: uploaded on their own terms, or not at all
TRANSFERS = 8  # files moved at once by a push or a pull (``store.transfers``)
LOG_SUFFIX = ".out"  # slurm-*.out, local-*.out: open for appending while the job that writes them pushes


def local_files(root: Path, folder: str) -> dict[str, Path]:
    """The files of ``root/folder`` to push, by their key relative to the run (hidden and ``SKIPPED`` left out)."""
    base = Path(root) / folder
    out = {}
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts) or any(part in SKIPPED for part in rel.parts[:-1]):
            continue
        if rel.name.endswith(LOG_SUFFIX):
            continue
        out[f"{folder.strip('/')}/{rel.as_posix()}"] = path
    return out


def read_index(store: ObjectStore, folder: str) -> dict | None:
    """``folder``'s index (``{files: {key: {sha256, size}}}``), or None when it has none."""
    try:
        index = store.read_json(f"{folder.strip('/')}/{INDEX}")
    except FileNotFoundError:
        return None
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
        raise Unusable(f"{store.url_of(folder)}/{INDEX} is not an index of files: push the folder again")
    return index


def each(fn, items: list, transfers: int) -> list:
    """``[fn(item) for item in items]`` with up to ``transfers`` at once (a bucket serves many connections far
    faster than one); the first error is raised once the calls under way have ended, and the rest are not begun."""
    if transfers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=min(int(transfers), len(items)), thread_name_prefix="ddm-transfer")
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def push_folder(
    store: ObjectStore,
    root,
    folder: str,
    only: tuple[str, ...] | None = None,
    about: dict | None = None,
    transfers: int = TRANSFERS,
    keep: bool = False,
) -> dict:
    """Upload ``root/folder``'s new or changed files, ``transfers`` at once, then its index; returns
    ``{uploaded, kept, bytes}``.

    ``only``: just these files of the folder (names relative to it): the index then lists only them.
    ``about``: what the index says of the folder besides its files (a checkpoint's step), read by ``read_index``.
    ``keep``: the index keeps listing the files it listed that this copy lacks (a job that adds files to a folder
    another job wrote, without pulling it first).
    """
    folder = folder.strip("/")
    files = local_files(Path(root), folder)
    if only is not None:
        files = {k: p for k, p in files.items() if k[len(folder) + 1 :] in only}
    if not files:
        raise MissingInput(f"{Path(root) / folder} holds no files to push")
    before = (read_index(store, folder) or {}).get("files", {})

    def send(item) -> tuple[dict, bool]:
        key, path = item
        entry = dict(sha256=sha256_file(path), size=path.stat().st_size)
        if before.get(key[len(folder) + 1 :]) == entry and store.exists(key):
            return entry, False
        store.put_file(path, key)
        return entry, True

    sent = each(send, list(files.items()), transfers)
    listing = dict(before) if keep else {}
    listing.update({key[len(folder) + 1 :]: entry for key, (entry, _) in zip(files, sent)})
    uploaded = [key for key, (_, new) in zip(files, sent) if new]
    store.put_json(dict(about or {}, files=listing), f"{folder}/{INDEX}")  # last: the folder is whole from here on
    size = sum(entry["size"] for entry, new in sent if new)
    return dict(uploaded=uploaded, kept=len(files) - len(uploaded), bytes=size)


def indexed_folders(store: ObjectStore, folder: str) -> list[str]:
    """The folders at or under ``folder`` that were pushed whole (have an index), a job's own state below it (an
    expert's uploaded checkpoints) left out: that is pulled only when asked for by its name."""
    folder = folder.strip("/")
    indexed = [k[: -len(INDEX)].rstrip("/") for k in store.list(folder) if k.endswith(f"/{INDEX}") or k == INDEX]
    return [base for base in indexed if not any(part in SKIPPED for part in base[len(folder) :].split("/"))]


def pull_folder(store: ObjectStore, root, folder: str, transfers: int = TRANSFERS) -> dict:
    """Bring ``folder`` to ``root``: every indexed folder at or under it, or its part of the nearest indexed folder
    above it (one cluster of ``partitions/``); returns ``{downloaded, kept, bytes}``.

    Raises ``MissingInput`` naming the URL when no index covers it (not pushed, or not pushed whole).
    """
    folder = folder.strip("/")
    indexed = indexed_folders(store, folder)
    entries = [(base, rel, e) for base in indexed for rel, e in read_index(store, base)["files"].items()]
    if not indexed:
        above = _index_above(store, folder)
        if above is not None:
            base, index = above
            inside = folder[len(base) + 1 :] + "/"
            entries = [(base, rel, e) for rel, e in index["files"].items() if rel.startswith(inside)]
    if not entries:
        raise MissingInput(
            f"{store.url_of(folder)} holds no finished folder (no {INDEX}): the job that writes it has not pushed "
            f"it whole yet; run it (or wait for it) first"
        )
    checked = Checked(root)
    wanted = [(base, rel, entry) for base, rel, entry in entries if not checked.holds(f"{base}/{rel}", entry)]

    def fetch(item) -> None:
        base, rel, entry = item
        _download(store, root, base, rel, entry)
        fetched.append((f"{base}/{rel}", entry))  # list.append is atomic: the threads share it safely

    fetched: list = []
    try:
        each(fetch, wanted, transfers)
    finally:  # what came down whole is recorded, also when another file failed
        for key, entry in fetched:
            checked.add(key, entry)
        checked.save()
    downloaded = [f"{base}/{rel}" for base, rel, _ in wanted]
    received = sum(int(entry["size"]) for _, _, entry in wanted)
    return dict(downloaded=downloaded, kept=len(entries) - len(wanted), bytes=received)


class Checked:
    """The files of a working copy whose sha256 this machine checked, with the size and modification time they had
    then: a later pull (another rank of the same job, a rerun) takes a file unchanged since without reading it
    again. Anything else (a file changed, or not in the record) is hashed."""

    NAME = ".ddm-checked.json"

    def __init__(self, root):
        self.path = Path(root) / self.NAME
        try:
            self.seen = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.seen = {}
        self.changed = False

    def _stamp(self, local: Path, sha256: str) -> list:
        st = local.stat()
        return [st.st_size, st.st_mtime_ns, sha256]

    def holds(self, key: str, entry: dict) -> bool:
        """Whether the working copy's ``key`` is the file ``entry`` (``{sha256, size}``) describes."""
        local = self.path.parent / key
        if not local.exists() or local.stat().st_size != entry["size"]:
            return False
        if self.seen.get(key) == self._stamp(local, entry["sha256"]):
            return True
        if sha256_file(local) != entry["sha256"]:
            return False
        self.add(key, entry)
        return True

    def add(self, key: str, entry: dict) -> None:
        self.seen[key] = self._stamp(self.path.parent / key, entry["sha256"])
        self.changed = True

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.NAME}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(self.seen))
            os.replace(tmp, self.path)


def _download(store: ObjectStore, root, base: str, rel: str, entry: dict) -> None:
    """The file ``rel`` of the indexed folder ``base`` to ``root``, checked against its index ``entry``."""
    source = object_key(base, rel, entry)
    try:
        store.get_file(source, Path(root) / base / rel, sha256=entry["sha256"])
    except FileNotFoundError:
        raise Unusable(
            f"{store.url_of(source)} is listed in the index of its folder ({INDEX}) but is not there: the folder "
            f"was damaged after it was pushed; push it again from the job that made it"
        ) from None


def object_key(base: str, rel: str, entry: dict) -> str:
    """The key that holds the file ``rel`` of the indexed folder ``base``: its own name, or the object its entry
    names (``object``: a file replaced now and then, uploaded under a new name each time so that the index and
    the objects it lists always agree, as ``CheckpointUpload`` does)."""
    return f"{base}/{entry.get('object') or rel}"


def _index_above(store: ObjectStore, key: str) -> tuple[str, dict] | None:
    """The nearest folder above ``key`` with an index, and that index."""
    parts = key.strip("/").split("/")
    for depth in range(len(parts) - 1, 0, -1):
        base = "/".join(parts[:depth])
        index = read_index(store, base)
        if index is not None:
            return base, index
    return None


def pull_file(store: ObjectStore, root, key: str) -> Path:
    """One file of an indexed folder (the nearest index above it), checked; returns its local path."""
    key = key.strip("/")
    above = _index_above(store, key)
    rel = None if above is None else key[len(above[0]) + 1 :]
    if above is None or rel not in above[1]["files"]:
        raise MissingInput(f"{store.url_of(key)} is in no finished folder (no {INDEX} lists it): push its folder first")
    checked = Checked(root)
    _pull_listed(store, root, above[0], [(rel, above[1]["files"][rel])], checked)
    checked.save()
    return Path(root) / key


def pull_matching(store: ObjectStore, root, pattern: str) -> list[Path]:
    """The files of the indexed folders at, above or under the fixed part of ``pattern`` whose keys match it
    (``partitions/cluster-*/manifest.json``, ``experts/expert-*/record.json``), each checked; returns their local
    paths (none when nothing matches). Each index is read once, whatever the number of files it lists."""
    pattern = pattern.strip("/")
    fixed = pattern.split("*", 1)[0].rsplit("/", 1)[0]
    above = _index_above(store, fixed + "/x")  # the folder itself, or the nearest above it
    bases = [above] if above is not None else [(b, read_index(store, b)) for b in indexed_folders(store, fixed)]
    checked, paths = Checked(root), []
    for base, index in bases:
        listed = [(rel, e) for rel, e in index["files"].items() if fnmatch.fnmatchcase(f"{base}/{rel}", pattern)]
        _pull_listed(store, root, base, listed, checked)
        paths += [Path(root) / base / rel for rel, _ in listed]
    checked.save()
    return sorted(paths)


def _pull_listed(store: ObjectStore, root, base: str, listed: list[tuple[str, dict]], checked: Checked) -> None:
    """The files ``listed`` (``(name, index entry)``) of the indexed folder ``base`` that this copy lacks."""
    for rel, entry in listed:
        if not checked.holds(f"{base}/{rel}", entry):
            _download(store, root, base, rel, entry)
            checked.add(f"{base}/{rel}", entry)
