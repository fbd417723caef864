"""How one sample is laid out in a shard: its tar members, and the stored image's formats (PNG, JPEG)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from ddm.errors import BadInput

# How a shard stores an image (``data.image_format``) and the extension of its tar member.
IMAGE_FORMATS = {"png": "png", "jpeg": "jpg"}
STORED_IMAGE_EXTS = ("png", "jpg")
DEFAULT_JPEG_QUALITY = 95


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxW (grayscale) or HxWx3 (RGB) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(
    image: np.ndarray, image_format: str = "png", quality: int = DEFAULT_JPEG_QUALITY
) -> tuple[str, bytes]:
    """uint8 HxW or HxWx3 -> (tar extension, bytes) in ``image_format`` (``png``, lossless, or ``jpeg``).

    JPEG is written at ``quality`` with 4:2:0 chroma subsampling (libjpeg's default, as photographs are
    usually stored) and no metadata, so the same pixels give the same bytes.
    """
    if image_format == "png":
        return "png", encode_png(image)
    if image_format != "jpeg":
        raise BadInput(f"image format {image_format!r}: use png or jpeg")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return "jpg", buf.getvalue()


def decode_stored(data: bytes) -> np.ndarray:
    """A stored image's bytes (PNG or JPEG) -> uint8 HxW or HxWx3."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy()


def stored_image(raw: dict) -> tuple[str, bytes] | None:
    """``(extension, bytes)`` of the image a raw sample (``iter_shard``'s dicts) holds, or None."""
    for ext in STORED_IMAGE_EXTS:
        if ext in raw:
            return ext, raw[ext]
    return None


def sample_members(
    key: str,
    encoded: tuple[str, bytes] | None,
    label: int,
    caption: str | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    meta: dict | None = None,
) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order they are stored: image, arrays, cls, txt, json."""
    if "." in key or "/" in key:
        raise BadInput(f"sample key {key!r} must not contain '.' or '/' (webdataset splits keys on them)")
    members = []
    if encoded is not None:
        ext, data = encoded
        if ext not in STORED_IMAGE_EXTS:
            raise BadInput(f"sample {key!r}: stored images are {' or '.join(STORED_IMAGE_EXTS)}, not {ext!r}")
        members.append((f"{key}.{ext}", data))
    for ext, array in (arrays or {}).items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        members.append((f"{key}.{ext}", buf.getvalue()))
    members.append((f"{key}.cls", str(int(label)).encode()))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()))
    return members


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same checksum
    tar.addfile(info, io.BytesIO(data))
