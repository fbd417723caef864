"""Existing webdataset shards (``data.urls``), read in a seeded order of the shards and re-keyed.

A shard set is a stream: it cannot be indexed without reading it whole, so only
the order of the input *shards* is permuted (with the run's seed); the samples
inside one input shard keep their order, and a ``data.limit`` keeps the first
samples in that shard order. Input shards sorted by class (one class per shard)
thus reach ``data/`` as runs of one class. The partition stage permutes each
cluster's samples itself, so experts and the router do not see those runs; what
does is whatever reads ``data/`` in stored order: a ``data.limit`` subset, and
the evaluate stage's held-out slice (the last samples of ``data/``). Shuffle such
shards beforehand, or prepare them as an ``image_folder``, where that matters.
"""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ddm.data.sources.base import Sample, Source, SourceMeta, check_split, config_channels, make_key
from ddm.data.sources.decode import Skipped, UnreadableImage, check_background, decode_image
from ddm.data.sources.order import PERMUTED_SHARDS, Order, permutation
from ddm.errors import BadInput, MissingInput
from ddm.settings import Data

WDS_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


GLOB_CHARS = ("*", "?", "[")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _expand(pattern: str) -> list[str]:
    """One entry of data.urls -> shard URLs: a folder (its ``*.tar`` files), a glob, or a brace pattern."""
    from braceexpand import braceexpand

    if _is_local(pattern) and Path(pattern).is_dir():
        found = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not found:
            raise MissingInput(f"data.urls={pattern} is a folder with no .tar shards in it: point it at the shards")
        return found
    if _is_local(pattern) and any(c in pattern for c in GLOB_CHARS):
        found = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
        if not found:
            raise MissingInput(f"data.urls={pattern} matches no file: fix the pattern")
        return found
    return list(braceexpand(pattern))


def _url_list(urls) -> list[str]:
    """data.urls (a folder, a glob or a brace pattern, or a list of them) -> the list of shard URLs."""
    if urls is None:
        raise BadInput(
            "data.urls is not set: give the shards, e.g. data.urls='/data/shards/shard-{000000..000009}.tar', "
            "a folder of .tar shards, or a glob"
        )
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    out = [u for pattern in patterns for u in _expand(pattern)]
    for url in out:
        # Remote URLs and pipe: commands fail inside webdataset; local files can be checked here.
        if not _is_local(url):
            continue
        if not Path(url).is_file():
            raise MissingInput(f"webdataset shard {url} (from data.urls) does not exist: fix data.urls")
        if not tarfile.is_tarfile(url):
            raise BadInput(
                f"webdataset shard {url} (from data.urls) is not a tar file: data.urls must name .tar shards "
                f"(a folder of them, a glob or a brace pattern)"
            )
    if not out:
        raise BadInput(f"data.urls={urls!r} names no shards")
    return out


def _label(raw: dict, origin: str) -> int:
    if "cls" not in raw:
        return -1
    text = raw["cls"].decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError as e:
        raise BadInput(f"sample {origin}: .cls holds {text[:40]!r}, not a class index: fix the shard") from e


def _caption(raw: dict, origin: str) -> str | None:
    if "txt" not in raw:
        return None
    try:
        return raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"sample {origin}: .txt is not UTF-8 text ({e}): write captions as UTF-8") from e


def webdataset(cfg: Data, seed: int) -> Source:
    """The shards' samples, shard by shard in a seeded order; key ``i`` is the i-th sample read.

    A sample whose image cannot be decoded (or that has none) is left out under ``data.on_error=skip``;
    it keeps its index, so the keys of the others do not depend on it.
    """
    import webdataset as wds

    split = check_split(cfg.split)
    listed = _url_list(cfg.urls)
    urls = [listed[i] for i in permutation(len(listed), seed)]
    channels = config_channels(cfg)
    background = check_background(cfg.background)
    skipped = Skipped(cfg.on_error)

    def samples() -> Iterator[Sample]:
        # Unshuffled by webdataset, one process: keys follow the (permuted) shard order.
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
        for i, raw in enumerate(dataset):
            origin = f"{raw.get('__url__', '?')}#{raw.get('__key__', '?')}"
            ext = next((e for e in WDS_IMAGE_EXTS if e in raw), None)
            try:
                if ext is None:
                    raise UnreadableImage(
                        f"sample {origin}",
                        f"has no image (looked for .{', .'.join(WDS_IMAGE_EXTS)}); every sample of data.urls needs one",
                    )
                image = decode_image(raw[ext], channels, background, origin=f"{origin}.{ext}")
            except UnreadableImage as e:
                skipped.handle(e)  # raises unless data.on_error=skip
                continue
            yield Sample(make_key("wds", split, i), image, _label(raw, origin), _caption(raw, origin), origin)

    meta = SourceMeta(image_size=None, channels=channels, num_classes=int(cfg.num_classes or 0), class_names=None)
    return Source("wds", split, meta, samples(), Order(PERMUTED_SHARDS, int(seed)), skipped)
