"""Where each sample of a set of local tar shards lies, so samples can be read back in any order.

A tar can only be read front to back unless the byte range of a sample is
known. ``index_spans`` walks the headers alone (tarfile seeks over the data) and
keeps, per sample, its shard and byte range: 20 bytes per sample whatever the
images weigh. ``read_spans`` then reads any selection of samples with one shard
file open at a time, seeking forward through each file.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def _padded(size: int) -> int:
    """A member's data occupies whole tar blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def shard_spans(path: str) -> Iterator[tuple[str, int, int]]:
    """``(key, start, end)`` of every sample of one local tar shard, in stored order, from its headers.

    A sample is the run of consecutive members whose names share the part before
    the first dot (``key.png``, ``key.cls``, ...), as webdataset groups them;
    ``[start, end)`` covers their headers and data.
    """
    key, start, end = None, 0, 0
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.partition(".")[0]
            if name != key:
                if key is not None:
                    yield key, start, end
                key, start = name, member.offset
            end = member.offset_data + _padded(member.size)
    if key is not None:
        yield key, start, end


@dataclass
class Spans:
    """Sample ``i`` of a shard set lies in ``paths[shard[i]]`` at bytes ``[start[i], end[i])``."""

    paths: list[str]
    shard: np.ndarray  # int32 [N]
    start: np.ndarray  # int64 [N]
    end: np.ndarray  # int64 [N]


def index_spans(paths: Sequence[str], expected_keys: Sequence[str], on_mismatch) -> Spans:
    """The spans of every sample of ``paths``, checked to hold exactly ``expected_keys`` in that order.

    ``on_mismatch(position, found_key)`` builds the exception raised when sample
    ``position`` is not the expected one (``found_key`` None: the shards ended
    early); its wording belongs to the caller, which knows what the keys are.
    """
    n = len(expected_keys)
    shard = np.empty(n, dtype=np.int32)
    start = np.empty(n, dtype=np.int64)
    end = np.empty(n, dtype=np.int64)
    i = 0
    for s, path in enumerate(paths):
        for key, lo, hi in shard_spans(path):
            if i >= n or key != expected_keys[i]:
                raise on_mismatch(i, key)
            shard[i], start[i], end[i] = s, lo, hi
            i += 1
    if i != n:
        raise on_mismatch(i, None)
    return Spans(list(paths), shard, start, end)


def _parse(chunk: bytes) -> dict:
    """One sample's members -> ``{"key": key, ext: bytes, ...}`` (the form ``iter_shard`` yields)."""
    sample: dict = {}
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                sample.setdefault("key", key)
                sample[ext] = tar.extractfile(member).read()
    return sample


def read_spans(spans: Spans, which: np.ndarray) -> dict[int, dict]:
    """Samples ``which`` (indices into ``spans``) as ``{index: raw sample}``.

    Reads go in file order (shard, then offset), whatever order ``which`` is in,
    so each shard file is opened once and read forward.
    """
    which = np.asarray(which, dtype=np.int64)
    by_place = which[np.lexsort((spans.start[which], spans.shard[which]))]
    out: dict[int, dict] = {}
    current, f = -1, None
    try:
        for i in by_place.tolist():
            if spans.shard[i] != current:
                if f is not None:
                    f.close()
                current = int(spans.shard[i])
                f = open(spans.paths[current], "rb")
            f.seek(int(spans.start[i]))
            out[i] = _parse(f.read(int(spans.end[i] - spans.start[i])))
    finally:
        if f is not None:
            f.close()
    return out
