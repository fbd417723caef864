"""One unit of a source -> one shard: read, fit to the manifest, encode (or pass the source's bytes), write."""

from __future__ import annotations

import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddm.data.shard_format import IMAGE_FORMATS, add_member, encode_image, sample_members
from ddm.data.sources import Skipped, UnitReader
from ddm.errors import BadInput
from ddm.io import sha256_file


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class StoreOptions:
    """How images are stored (``data.image_format``, ``data.quality``)."""

    image_format: str = "png"
    quality: int = 95

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise BadInput(
                f"data.image_format={self.image_format!r}: use jpeg (photographs: small, lossy at data.quality) "
                f"or png (lossless: small grayscale sets)"
            )
        if not 1 <= int(self.quality) <= 100:
            raise BadInput(f"data.quality={self.quality}: give a JPEG quality from 1 to 100 (95 keeps detail)")


@dataclass
class UnitResult:
    """What writing one unit gave: its shard's entry (None when no sample was left), keys, skipped images."""

    index: int
    shard: dict | None
    keys: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    passed_through: int = 0  # samples stored as the source's own bytes

    def as_dict(self) -> dict:
        return asdict(self)


def write_unit(
    folder: Path, index: int, unit, reader: UnitReader, options: StoreOptions, cap: int | None = None
) -> UnitResult:
    """Write unit ``index`` to ``folder/shard-<index>.tar``; ``cap``: stop after that many samples.

    An image the source stores already as asked (same format, decoded with no conversion, not resized)
    is written as the source's own bytes: re-encoding a JPEG would only lose detail and time.
    """
    final = folder / shard_name(index)
    tmp = folder / f".{final.name}.tmp"
    skipped = Skipped(reader.on_error)
    keys: list[str] = []
    first_key = last_key = None
    passed = 0
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample, changed in reader(unit, skipped):
                if cap is not None and len(keys) >= cap:
                    break
                if sample.plain is not None and not changed and sample.plain[0] == options.image_format:
                    encoded = (IMAGE_FORMATS[options.image_format], sample.plain[1])
                    passed += 1
                else:
                    encoded = encode_image(sample.image, options.image_format, options.quality)
                for name, data in sample_members(sample.key, encoded, sample.label, sample.caption, None, sample.meta):
                    add_member(tar, name, data)
                keys.append(sample.key)
                first_key = first_key or sample.key
                last_key = sample.key
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not keys:
        tmp.unlink()
        return UnitResult(index, None, [], skipped.records)
    os.replace(tmp, final)
    shard = dict(
        path=final.name,
        num_samples=len(keys),
        sha256=sha256_file(final),
        size=final.stat().st_size,
        first_key=first_key,
        last_key=last_key,
    )
    return UnitResult(index, shard, keys, skipped.records, passed)
