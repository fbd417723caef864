"""Decoding one image file (or the bytes of one) into the uint8 array a source yields: one set of rules.

Image folders and webdataset shards both decode through :func:`decode_image`, so
an image comes out the same from either:

- 16-bit grayscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I``
  as PIL reads 16-bit PNG/PGM) is scaled by its bit depth to 8 bit,
  ``round(value * 255 / 65535)``, not clipped at 255 (which turns most of it white).
  ``I`` pixels outside 0..65535 (a 32-bit integer image) are refused: there is no
  bit depth to scale by.
- Transparency (RGBA, LA, PA, palette or colour-key ``transparency``) is composited
  over ``data.background`` (``[R, G, B]``): ``round((c * a + bg * (255 - a)) / 255)``
  per channel, so a fully transparent pixel is the background whatever colour is
  stored under it. Grayscale output is the composited RGB converted to L.
- Everything else is converted by PIL to ``L`` (channels 1) or ``RGB`` (channels 3).
- A photo whose EXIF orientation says it was taken turned or mirrored (values 2-8) is
  turned upright first, as image viewers show it; its source bytes are then never
  stored as they are (they would decode on their side elsewhere).

A file that cannot be decoded (empty, truncated, not an image) raises
:class:`UnreadableImage`, a ``BadInput`` naming the file and the reason. With
``data.on_error=skip`` the sources catch it, leave the file out and record it
(:class:`Skipped`); ``prepare`` lists those in ``data/skipped.json``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ddm.errors import BadInput

log = logging.getLogger("ddm")

PIL_MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEFAULT_BACKGROUND = (255, 255, 255)  # white, as conf/data/*.yaml sets data.background
ON_ERROR = ("raise", "skip")
DEFAULT_ON_ERROR = "raise"
EXIF_ORIENTATION = 0x0112  # the EXIF tag cameras record a rotated shot in (1: upright; 2-8: mirrored, turned)


class UnreadableImage(BadInput):
    """An image that cannot be decoded; ``origin`` names it, ``reason`` says why (for ``data/skipped.json``)."""

    def __init__(self, origin: str, reason: str):
        super().__init__(
            f"{origin}: {reason}; delete or replace the file, or set data.on_error=skip to leave unreadable "
            f"images out (prepare lists them in data/skipped.json)"
        )
        self.origin = origin
        self.reason = reason

    def __reduce__(self):  # raised in a worker process, it travels back pickled
        return type(self), (self.origin, self.reason)


def check_background(value) -> tuple[int, int, int]:
    """``data.background`` as an (R, G, B) tuple of 0..255; None (a config without the key) is white."""
    if value is None:
        return DEFAULT_BACKGROUND
    values = list(value) if isinstance(value, (list, tuple)) else None
    if (
        values is None
        or len(values) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)
    ):
        raise BadInput(
            f"data.background={value!r}: give three values 0..255 as [R, G, B], "
            f"e.g. data.background=[255,255,255] (white) or [0,0,0] (black)"
        )
    return (values[0], values[1], values[2])


def check_on_error(value) -> str:
    """``data.on_error``: ``raise`` (stop at the first unreadable image) or ``skip``; None is ``raise``."""
    if value is None:
        return DEFAULT_ON_ERROR
    if value not in ON_ERROR:
        raise BadInput(
            f"data.on_error={value!r}: use raise (stop at the first unreadable image) "
            f"or skip (leave it out and list it in data/skipped.json)"
        )
    return str(value)


class Skipped:
    """The unreadable images a source left out under ``data.on_error=skip``, as it met them."""

    def __init__(self, on_error: str):
        self.on_error = check_on_error(on_error)
        self.records: list[dict] = []

    def handle(self, error: UnreadableImage) -> None:
        """Record ``error`` when skipping; re-raise it otherwise."""
        if self.on_error != "skip":
            raise error
        log.warning(f"prepare: skipping {error.origin}: {error.reason}")
        self.records.append(dict(file=error.origin, reason=error.reason))

    def __len__(self) -> int:
        return len(self.records)


def decode_image(
    data_or_path: bytes | str | os.PathLike,
    channels: int,
    background: Sequence[int] = DEFAULT_BACKGROUND,
    origin: str | None = None,
) -> np.ndarray:
    """The image in ``data_or_path`` (a file, or its bytes) as uint8: HxW for ``channels`` 1, HxWx3 for 3.

    ``origin`` names the image in errors (default: the path, or "image bytes"). Raises
    :class:`UnreadableImage` for a file that cannot be decoded.
    """
    return decode_with_format(data_or_path, channels, background, origin)[0]


def decode_with_format(
    data_or_path: bytes | str | os.PathLike,
    channels: int,
    background: Sequence[int] = DEFAULT_BACKGROUND,
    origin: str | None = None,
) -> tuple[np.ndarray, str | None]:
    """``decode_image``'s pixels, and the file's format (``jpeg``, ``png``, ...) when they are its plain content.

    The format is given only when the pixels are what any decoder makes of the bytes with no conversion
    (already ``L`` or ``RGB`` as asked, no transparency, 8 bit): those bytes can then be stored as they are.
    """
    if channels not in PIL_MODES:
        raise BadInput(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
    background = check_background(background)
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = bytes(data_or_path)
        origin = origin or "image bytes"
        if not data:
            raise UnreadableImage(origin, "empty (0 bytes), not an image")
        src = io.BytesIO(data)
    else:
        path = Path(data_or_path)
        origin = origin or str(path)
        try:
            if path.stat().st_size == 0:
                raise UnreadableImage(origin, "empty file (0 bytes), not an image")
        except OSError as e:
            raise UnreadableImage(origin, f"cannot be read ({e})") from e
        src = path
    try:
        im = Image.open(src)
    except UnidentifiedImageError as e:
        raise UnreadableImage(origin, "not an image PIL can identify (corrupt, or another kind of file)") from e
    except Image.DecompressionBombError as e:
        raise UnreadableImage(origin, f"refused as too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImage(origin, f"cannot be decoded ({e})") from e
    try:
        try:
            im.load()  # decodes the pixels now: a truncated or damaged file fails here, not later
        except Image.DecompressionBombError as e:
            raise UnreadableImage(origin, f"refused as too large ({e})") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UnreadableImage(origin, f"cannot be decoded, the file is truncated or damaged ({e})") from e
        plain = im.mode == PIL_MODES[channels] and "transparency" not in im.info
        upright = _upright(im)
        if upright is not im:  # a camera's rotated photo: its bytes, decoded plainly, would lie on their side
            with upright:
                return _pixels(upright, channels, background, origin), None
        return _pixels(im, channels, background, origin), (im.format or "").lower() if plain else None
    finally:
        im.close()


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says (a new image), or ``im`` itself when it needs no turning."""
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # damaged EXIF: the pixels as stored
        return im
    if orientation not in range(2, 9):  # 1 (or an invalid value): upright as stored
        return im
    return ImageOps.exif_transpose(im)


def _pixels(im: Image.Image, channels: int, background: tuple[int, int, int], origin: str) -> np.ndarray:
    """A decoded PIL image as uint8 ``channels``, by the rules in the module docstring."""
    transparency = im.info.get("transparency")
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnreadableImage(
                origin,
                f"{im.mode} pixels span {values.min()}..{values.max()}, beyond 16 bit (0..65535), so there is "
                f"no bit depth to scale them to 8 bit by; convert it to an 8- or 16-bit image",
            )
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535): no ties occur
        if not isinstance(transparency, int):
            return gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        rgb = composite(np.repeat(gray[:, :, None], 3, axis=2), alpha, background)
    elif im.mode in ALPHA_MODES or transparency is not None:
        rgba = np.asarray(im.convert("RGBA"))
        rgb = composite(rgba[:, :, :3], rgba[:, :, 3], background)
    else:
        return np.array(im.convert(PIL_MODES[channels]), dtype=np.uint8)
    if channels == 3:
        return rgb
    return np.array(Image.fromarray(rgb).convert("L"), dtype=np.uint8)


def composite(rgb: np.ndarray, alpha: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) over ``background`` with ``alpha`` (HxW, 0 transparent .. 255 opaque), rounded."""
    a = alpha.astype(np.int32)[:, :, None]
    bg = np.asarray(background, dtype=np.int32)[None, None, :]
    # round((c * a + bg * (255 - a)) / 255); the numerator is an integer, so x.5 never occurs
    return ((rgb.astype(np.int32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
