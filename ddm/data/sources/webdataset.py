"""Existing webdataset shards (``data.urls``), read in a seeded order of the shards, keys kept.

A shard set is a stream: it cannot be indexed without reading it whole, so only
the order of the input *shards* is permuted (with the run's seed); each input
shard becomes one shard of ``data/`` (``data.shard_size`` does not apply), its
samples in their order, and a ``data.limit`` keeps the first samples in that
shard order. A sample's key is its shard's name and its own ``__key__``, and its
``json`` (img2dataset's url, original size, sha256) travels with it. Input shards sorted by class (one class per shard)
thus reach ``data/`` as runs of one class. The partition stage permutes each
cluster's samples itself, so experts and the router do not see those runs; what
does is whatever reads ``data/`` in stored order: a ``data.limit`` subset, and
the evaluate stage's held-out slice (the last samples of ``data/``). Shuffle such
shards beforehand, or prepare them as an ``image_folder``, where that matters.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ddm.data.sources.base import Sample, SourceMeta, Streamed, check_split, config_channels, named_key
from ddm.data.sources.decode import UnreadableImage, check_background, decode_with_format
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


def shard_names(urls: list[str]) -> dict[str, str]:
    """Each shard URL's name in sample keys: the URL after the folder all of them share, without ``.tar``.

    ``/data/laion/00012.tar`` -> ``00012`` (or ``a/00012`` beside ``b/00012``), so a sample's key names its
    shard and its own ``__key__`` whatever order the shards are read in.
    """
    cut = os.path.commonprefix(urls).rfind("/") + 1 if len(urls) > 1 else urls[0].rfind("/") + 1
    names = {url: url[cut:].removesuffix(".tar") for url in urls}
    if len(set(names.values())) != len(names):
        raise BadInput(f"data.urls names one shard twice ({urls[:3]}...): list each shard once")
    return names


class _ShardReader:
    """Reads one input shard (a unit), sample by sample; picklable."""

    def __init__(self, split: str, channels: int, background: tuple[int, int, int], names: dict[str, str]):
        self.split, self.channels, self.background, self.names = split, channels, background, names

    def __call__(self, url: str, skipped) -> Iterator[Sample]:
        import webdataset as wds

        # One shard, unshuffled, read where this runs: no node or worker splitting of its own.
        dataset = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
        seen = set()
        for raw in dataset:
            key = raw.get("__key__", "?")
            origin = f"{url}#{key}"
            if key in seen:
                raise BadInput(f"{url} holds two samples with the key {key!r}: give every sample its own key")
            seen.add(key)
            ext = next((e for e in WDS_IMAGE_EXTS if e in raw), None)
            try:
                if ext is None:
                    raise UnreadableImage(
                        f"sample {origin}",
                        f"has no image (looked for .{', .'.join(WDS_IMAGE_EXTS)}); every sample of data.urls needs one",
                    )
                image, plain = decode_with_format(raw[ext], self.channels, self.background, origin=f"{origin}.{ext}")
            except UnreadableImage as e:
                skipped.handle(e)  # raises unless data.on_error=skip
                continue
            meta = dict(shard=url, key=key, **({"source": _json(raw, origin)} if "json" in raw else {}))
            yield Sample(
                named_key("wds", self.split, f"{self.names[url]}/{key}"),
                image,
                _label(raw, origin),
                _caption(raw, origin),
                origin,
                (plain, raw[ext]) if plain else None,
                meta,
            )


def _json(raw: dict, origin: str):
    try:
        return json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"sample {origin}: .json is not JSON ({e}): fix the shard") from e


def webdataset(cfg: Data, seed: int) -> Streamed:
    """The shards' samples, one input shard per unit; a sample's key is its shard's name and its own key.

    A sample whose image cannot be decoded (or that has none) is left out under ``data.on_error=skip``.
    """
    split = check_split(cfg.split)
    urls = _url_list(cfg.urls)
    reader = _ShardReader(split, config_channels(cfg), check_background(cfg.background), shard_names(urls))
    meta = SourceMeta(
        image_size=None, channels=reader.channels, num_classes=int(cfg.num_classes or 0), class_names=None
    )
    return Streamed("wds", split, meta, urls, reader)
