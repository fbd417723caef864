"""``<run>/evaluation/heldout/``: the held-out real images of a run, chosen by ``cfg.eval.heldout``.

Held-out images are prepared once (webdataset shards plus a manifest, like
every other shard set), from one of:

- ``split``: the same source read with ``data.split=<eval.heldout.split>``
  (Fashion-MNIST's 10000 test images), optionally with other data settings
  (``eval.heldout.data``, e.g. the root of a separate test folder), in the
  seeded order ``prepare`` uses, so ``eval.heldout.limit`` keeps a random subset;
- ``slice``: the last ``eval.heldout.fraction`` of the run's own ``data/`` samples,
  in stored order (a seeded random order, see ``ddm.stages.prepare``). For
  sources with one split only (scikit-learn's digits).
  The experts and the router trained on these images too, so this is a smoke
  test of the metrics rather than a true hold-out; the feature net at least
  never sees them.

``auto`` picks ``split`` for sources known to have a separate test split, or
when ``eval.heldout.data`` names one, and ``slice`` otherwise: an image folder
or a set of shards read again with another split name would be the same images.

The manifest records a fingerprint of these settings and of ``data/``; a
later evaluation with the same fingerprint reuses the folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.data.shards import MANIFEST, ShardSetWriter, iter_samples, load_manifest, shard_paths
from ddm.data.sources import open_source
from ddm.errors import BadInput
from ddm.eval.run import evaluation_dir
from ddm.io import read_json, sha256_strings
from ddm.settings import Data, Settings, changed

log = logging.getLogger("ddm")

# Sources whose `split` selects genuinely different images.
SOURCES_WITH_TEST_SPLIT = ("fashion_mnist",)
MODES = ("auto", "split", "slice")


def heldout_dir(rd: RunDir) -> Path:
    return evaluation_dir(rd) / "heldout"


def resolve_mode(cfg: Settings) -> str:
    """``split`` or ``slice``: ``eval.heldout.mode``, with ``auto`` decided by the data source."""
    mode = str(cfg.eval.heldout.mode)
    if mode not in MODES:
        raise BadInput(f"eval.heldout.mode={mode!r} is not one of {MODES}")
    if mode != "auto":
        return mode
    overrides = cfg.eval.heldout.data or {}
    return "split" if cfg.data.source in SOURCES_WITH_TEST_SPLIT or len(overrides) else "slice"


def _fingerprint(cfg: Settings, mode: str, data_manifest: dict) -> dict:
    hc = cfg.eval.heldout
    fp = dict(mode=mode, limit=hc.limit, data_keys_sha256=data_manifest.get("keys_sha256"))
    if mode == "split":
        fp.update(split=str(hc.split), data=_split_data_cfg(cfg).to_dict(), seed=int(cfg.seed))
    else:
        fp.update(fraction=float(hc.fraction))
    return fp


def _split_data_cfg(cfg: Settings) -> Data:
    """The run's data settings read at the held-out split, with ``eval.heldout.data`` on top."""
    hc = cfg.eval.heldout
    overrides = hc.data or {}
    return changed(cfg.data, {"split": str(hc.split), "limit": hc.limit, **overrides})


def prepare_heldout(cfg: Settings, redo: bool = False) -> dict:
    """Write (or reuse) ``evaluation/heldout/`` for ``cfg``; return its manifest.

    Besides the usual shard-set fields the manifest holds ``mode``,
    ``fingerprint``, ``keys_sha256``, ``note`` (where the images came from) and
    ``excluded_from_training`` (True for a slice of ``data/``: the feature net
    must not train on it).
    """
    rd = RunDir(cfg.run_dir)
    folder = heldout_dir(rd)
    data_manifest = load_manifest(rd.data)
    mode = resolve_mode(cfg)
    fp = _fingerprint(cfg, mode, data_manifest)
    if (folder / MANIFEST).exists() and not redo:
        manifest = read_json(folder / MANIFEST)
        if manifest.get("fingerprint") == fp:
            return manifest
    if folder.exists():
        shutil.rmtree(folder)
    shard_size = int(cfg.data.shard_size)
    common = dict(
        mode=mode,
        fingerprint=fp,
        image_size=data_manifest["image_size"],
        channels=data_manifest["channels"],
        num_classes=data_manifest["num_classes"],
        class_names=data_manifest.get("class_names"),
    )
    keys: list[str] = []
    if mode == "split":
        source = open_source(_split_data_cfg(cfg), int(cfg.seed))
        with ShardSetWriter(
            folder, shard_size, source=cfg.data.source, split=source.split, order=source.order.as_dict(), **common
        ) as w:
            for s in source.samples:
                w.write(s.key, s.image, s.label, s.caption)
                keys.append(s.key)
            _check_nonempty(keys, cfg)
            w.extra.update(
                keys_sha256=sha256_strings(keys),
                excluded_from_training=False,
                note=f"data.split={source.split} of data.source={cfg.data.source}",
            )
    else:
        total = int(data_manifest["num_samples"])
        n = max(1, int(round(float(cfg.eval.heldout.fraction) * total)))
        if cfg.eval.heldout.limit is not None:
            n = min(n, int(cfg.eval.heldout.limit))
        if n >= total:
            raise BadInput(
                f"eval.heldout.fraction={cfg.eval.heldout.fraction} leaves no training images "
                f"({total} in data/); use a smaller fraction"
            )
        first = total - n
        with ShardSetWriter(
            folder, shard_size, source=cfg.data.source, split=data_manifest.get("split"), **common
        ) as w:
            # image bytes copied as stored: the held-out images are exactly the training set's
            for i, s in enumerate(iter_samples(shard_paths(rd.data, data_manifest), decode=False)):
                if i >= first:
                    w.write(s["key"], None, s["label"], s.get("caption"), encoded=s["encoded"], meta=s.get("meta"))
                    keys.append(s["key"])
            w.extra.update(
                keys_sha256=sha256_strings(keys),
                excluded_from_training=True,
                note=f"the last {n} of {total} samples of data/ (experts and router trained on "
                f"them; the feature net did not)",
            )
    manifest = w.manifest
    log.debug("evaluate: held-out set (%s): %d images -> %s", mode, manifest["num_samples"], folder)
    return manifest


def _check_nonempty(keys, cfg) -> None:
    if not keys:
        raise BadInput(
            f"the held-out source (data.source={cfg.data.source}, split={cfg.eval.heldout.split}) "
            f"gave no images; check eval.heldout.data"
        )
