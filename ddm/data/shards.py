"""Webdataset shard sets: writing them atomically with a manifest, and reading them back.

A shard set is a folder of ``shard-NNNNNN.tar`` files plus ``manifest.json``::

    {"num_samples": N, "shards": [{"path": "shard-000000.tar", "num_samples": n,
      "sha256": "...", "first_key": "...", "last_key": "..."}, ...],
     "image_size": 28, "channels": 1, "num_classes": 10, ...extra fields}

Each tar is written under a temporary name and renamed when closed; the manifest
is written last, so a folder with a manifest is a complete shard set.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ddm.data.shard_format import (
    DEFAULT_JPEG_QUALITY,
    add_member,
    decode_stored,
    encode_image,
    sample_members,
    stored_image,
)
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, remake_hint, sha256_file, sha256_strings, write_json

MANIFEST = "manifest.json"


class ShardSetWriter:
    """Writes samples into fixed-size tar shards in ``folder``; ``close()`` writes the manifest.

    Used as a context manager: on an exception, no manifest is written, so the
    folder does not look complete.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        shard_size: int,
        image_format: str = "png",
        quality: int = DEFAULT_JPEG_QUALITY,
        **manifest_extra,
    ):
        if shard_size < 1:
            raise BadInput(f"shard_size={shard_size} must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.image_format, self.quality = image_format, int(quality)
        self.extra = manifest_extra
        self.shards: list[dict] = []
        self._tar = None
        self._tmp = None
        self._count = 0
        self._keys: list[str] = []

    def _open(self):
        name = f"shard-{len(self.shards):06d}.tar"
        self._final = self.folder / name
        self._tmp = self.folder / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0
        self._first = None

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self._final)
        self.shards.append(
            dict(
                path=self._final.name,
                num_samples=self._count,
                sha256=sha256_file(self._final),
                first_key=self._first,
                last_key=self._last,
            )
        )
        self._tar = None

    def _add(self, name: str, data: bytes):
        add_member(self._tar, name, data)

    def write(
        self,
        key: str,
        image: np.ndarray | None,
        label: int,
        caption: str | None = None,
        encoded: tuple[str, bytes] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        meta: dict | None = None,
    ):
        """One sample: its image (or ready ``(ext, bytes)``), label, caption, named arrays and metadata.

        ``arrays`` (``{"npy": latent}``) are stored as ``.npy`` members; a sample may have arrays and no
        image (a latent shard set). ``meta`` (where the sample came from) is stored as ``key.json``.
        """
        if image is None and encoded is None and not arrays:
            raise BadInput(f"sample {key!r} has neither an image nor arrays")
        if image is not None and encoded is None:
            encoded = encode_image(image, self.image_format, self.quality)
        if self._tar is None:
            self._open()
        for name, data in sample_members(key, encoded, label, caption, arrays, meta):
            self._add(name, data)
        if self._first is None:
            self._first = key
        self._last = key
        self._count += 1
        if self._count >= self.shard_size:
            self._close_shard()

    def close(self) -> dict:
        self._close_shard()
        manifest = dict(num_samples=sum(s["num_samples"] for s in self.shards), shards=self.shards, **self.extra)
        write_json(self.folder / MANIFEST, manifest)
        return manifest

    def abort(self):
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.manifest = self.close()
        else:
            self.abort()
        return False


def load_manifest(folder: str | os.PathLike) -> dict:
    """A shard set's manifest, read (not its shards checked: see ``verify``) and checked to be one.

    A damaged manifest (not JSON, or JSON without the shard list every reader indexes) is a
    ``BadInput`` naming it, not a ``KeyError`` somewhere downstream.
    """
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise MissingInput(
            f"no shard manifest at {path}: the stage that writes {Path(folder).name}/ has not finished; run it first"
        )
    manifest = read_json(path)
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if (
        not isinstance(shards, list)
        or not isinstance(manifest.get("num_samples"), int)
        or not all(isinstance(s, dict) and {"path", "num_samples", "sha256"} <= s.keys() for s in shards)
    ):
        raise BadInput(
            f"{path} is not a shard set's manifest (no num_samples, or shards without path, num_samples and "
            f"sha256): it was damaged or overwritten; remake it with {remake_hint(path)}"
        )
    return manifest


def shards_digest(manifest: dict, n: int | None = None) -> str:
    """One digest of a shard set's shard checksums, in order: names the exact bytes a later artefact was made from.

    Recorded by what is made from ``data/`` (embeddings, partitions) as ``data_shards_sha256``, so that a
    reader can tell data prepared again with the same keys but other images. ``n``: of the first ``n``
    shards only (``ddm extend`` appends shards, so data that grew keeps the digest of its first ones).
    """
    return sha256_strings(s["sha256"] for s in manifest["shards"][:n])


def shard_paths(folder: str | os.PathLike, manifest: dict | None = None, url: str | None = None) -> list[str]:
    """Absolute paths (or URLs, when the manifest holds URLs) of a shard set's shards.

    ``url``, when given, is a template that says where the shards really are, for an
    island that fetches only its own partition: ``{folder}`` is the shard set's folder
    name (``cluster-03``) and ``{shard}`` the shard's file name, e.g.
    ``pipe:aws s3 cp s3://bucket/run/partitions/{folder}/{shard} -`` or
    ``https://host/run/partitions/{folder}/{shard}`` (anything webdataset opens).
    """
    manifest = manifest or load_manifest(folder)
    if url:
        if "{shard}" not in url:
            raise BadInput(f"shard url template {url!r} must contain {{shard}} (and usually {{folder}})")
        return [url.format(folder=Path(folder).name, shard=s["path"]) for s in manifest["shards"]]
    out = []
    for s in manifest["shards"]:
        p = s["path"]
        out.append(p if "://" in p or p.startswith("pipe:") else str(Path(folder) / p))
    return out


def not_a_shard(path, error) -> BadInput:
    """The error for a shard that cannot be read as a tar (truncated, overwritten, not a tar at all)."""
    why = " ".join(str(error).split())  # tarfile lists each method it tried on its own line: one line here
    return BadInput(
        f"{path} is not a readable tar shard ({why}): it is truncated or damaged; remake it with {remake_hint(path)}"
    )


def iter_shard(path: str) -> Iterator[dict]:
    """Samples of one local tar shard in stored order: dicts with key, png (bytes), cls, txt.

    A shard that is not a whole tar is a ``BadInput`` naming it (not a bare ``tarfile.ReadError``).
    """
    sample: dict = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and sample["key"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("key", key)
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:
        raise not_a_shard(path, e) from None
    if sample:
        yield sample


def iter_samples(paths: Iterable[str], decode: bool = True) -> Iterator[dict]:
    """Stream samples shard by shard: key, label, and as stored, caption, latent, meta, the image.

    The image (PNG or JPEG) comes as ``image`` (uint8 array) or, with ``decode=False``, as
    ``encoded``: ``(extension, bytes)``. ``meta`` is the sample's ``json`` (where it came from).
    A latent shard set's samples carry ``latent`` (the float16 array under ``npy``) and no image.
    """
    for path in paths:
        for raw in iter_shard(path):
            try:
                out = dict(key=raw["key"], label=int(raw["cls"]) if "cls" in raw else -1)
                if "txt" in raw:
                    out["caption"] = raw["txt"].decode()
                if "json" in raw:
                    out["meta"] = json.loads(raw["json"])
                if "npy" in raw:
                    out["latent"] = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
                encoded = stored_image(raw)
                if encoded is not None:
                    if decode:
                        out["image"] = decode_stored(encoded[1])
                    else:
                        out["encoded"] = encoded
            except (ValueError, OSError, EOFError, SyntaxError) as e:  # PIL raises all of these for damaged images
                raise BadInput(
                    f"sample {raw.get('key')!r} of {path} cannot be decoded ({type(e).__name__}: {e}): the shard is "
                    f"damaged; remake it with {remake_hint(path)}"
                ) from None
            yield out


def stamp(path: str | os.PathLike) -> dict:
    """What tells a file changed without reading it: its size and modification time (ns)."""
    st = os.stat(path)
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns)


def missing_shard(folder, path) -> MissingInput:
    return MissingInput(
        f"shard {path} listed in {Path(folder) / MANIFEST} is missing: copy the whole folder again, or remake it "
        f"with {remake_hint(path)}"
    )


class ShardMismatch(BadInput):
    """A shard whose bytes are not the ones its manifest's sha256 names; ``shard`` is its name, ``found`` its stamp."""

    def __init__(self, folder, path, shard: str, found: dict):
        super().__init__(
            f"shard {path} does not match the checksum in its manifest ({Path(folder) / MANIFEST}): it was changed "
            f"or truncated; remake it with {remake_hint(path)}"
        )
        self.shard, self.found = shard, found


def check_shards(folder: str | os.PathLike, manifest: dict, known: dict | None = None) -> dict[str, dict]:
    """Check every shard of a set against its manifest's sha256; return ``{shard name: stamp + sha256}``.

    ``known``: what an earlier check found (the same form). A shard whose size and mtime are still
    the ones recorded there, for the sha256 the manifest still expects, is not read again: on an
    ImageNet partition (tens of GB) that is the difference between seconds and many minutes at every
    start. Anything else (a new file, another size or mtime, a manifest that now expects other
    bytes) is hashed. Other bytes of the same size with the recorded mtime (rewritten within one
    mtime tick, or copied over it with the mtime kept: ``cp -p``, ``rsync -t``) would pass unread;
    the stages never rewrite a shard in place, and a copy that keeps mtimes keeps the manifest too,
    whose other sha256 makes the shard read again.
    """
    known = known or {}
    checked = {}
    for s, path in zip(manifest["shards"], shard_paths(folder, manifest)):
        try:
            now = stamp(path)
        except FileNotFoundError:
            raise missing_shard(folder, path) from None
        entry = dict(now, sha256=s["sha256"])
        if known.get(s["path"]) != entry and sha256_file(path) != s["sha256"]:
            raise ShardMismatch(folder, path, s["path"], entry)
        checked[s["path"]] = entry
    return checked


def verify(folder: str | os.PathLike) -> dict:
    """Check every shard of a set against its manifest checksum; return the manifest.

    Reads every byte; a job that checks the same set at each start keeps what it found
    (``ddm.data.verified``) and rereads only what changed.
    """
    manifest = load_manifest(folder)
    check_shards(folder, manifest)
    return manifest
