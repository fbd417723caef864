"""The evaluation data of a run: held-out real images, the training images, and their clusters.

Held-out images are prepared once into ``<run>/evaluation/heldout/`` (webdataset
shards plus a manifest, like every other shard set), from one of:

- ``split``: the same source read with ``data.split=<eval.heldout.split>``
  (Fashion-MNIST's 10000 test images), optionally with other data settings
  (``eval.heldout.data``, e.g. the root of a separate test folder);
- ``slice``: the last ``eval.heldout.fraction`` of the run's own ``data/`` samples,
  in stored order. For sources with one split only (scikit-learn's digits).
  The experts and the router trained on these images too, so this is a smoke
  test of the metrics rather than a true hold-out; the feature net at least
  never sees them.

``auto`` picks ``split`` for sources known to have a separate test split, or
when ``eval.heldout.data`` names one, and ``slice`` otherwise: an image folder
or a set of shards read again with another split name would be the same images.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ddm.artifacts import RunDir
from ddm.data.shards import MANIFEST, ShardSetWriter, iter_samples, load_manifest, shard_paths
from ddm.data.sources import open_source
from ddm.io import read_json, sha256_strings

log = logging.getLogger("ddm")

# Sources whose `split` selects genuinely different images.
SOURCES_WITH_TEST_SPLIT = ("fashion_mnist",)
MODES = ("auto", "split", "slice")


def heldout_dir(rd: RunDir) -> Path:
    return rd.root / "evaluation" / "heldout"


def resolve_mode(cfg) -> str:
    mode = str(cfg.eval.heldout.mode)
    if mode not in MODES:
        raise ValueError(f"eval.heldout.mode={mode!r} is not one of {MODES}")
    if mode != "auto":
        return mode
    overrides = cfg.eval.heldout.get("data") or {}
    return "split" if cfg.data.source in SOURCES_WITH_TEST_SPLIT or len(overrides) else "slice"


def _fingerprint(cfg, mode: str, data_manifest: dict) -> dict:
    hc = cfg.eval.heldout
    fp = dict(mode=mode, limit=hc.limit, data_keys_sha256=data_manifest.get("keys_sha256"))
    if mode == "split":
        fp.update(split=str(hc.split), data=OmegaConf.to_container(_split_data_cfg(cfg), resolve=True))
    else:
        fp.update(fraction=float(hc.fraction))
    return fp


def _split_data_cfg(cfg):
    hc = cfg.eval.heldout
    overrides = hc.get("data")
    overrides = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else {}
    return OmegaConf.merge(cfg.data, dict(split=str(hc.split), limit=hc.limit), overrides)


def prepare_heldout(cfg, redo: bool = False) -> dict:
    """Write (or reuse) ``evaluation/heldout/`` for ``cfg``; return its manifest."""
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
    common = dict(mode=mode, fingerprint=fp, image_size=data_manifest["image_size"],
                  channels=data_manifest["channels"], num_classes=data_manifest["num_classes"],
                  class_names=data_manifest.get("class_names"))
    keys: list[str] = []
    if mode == "split":
        source = open_source(_split_data_cfg(cfg))
        with ShardSetWriter(folder, shard_size, source=cfg.data.source, split=source.split, **common) as w:
            for s in source.samples:
                w.write(s.key, s.image, s.label, s.caption)
                keys.append(s.key)
            _check_nonempty(keys, cfg)
            w.extra.update(keys_sha256=sha256_strings(keys), excluded_from_training=False,
                           note=f"data.split={source.split} of data.source={cfg.data.source}")
    else:
        total = int(data_manifest["num_samples"])
        n = max(1, int(round(float(cfg.eval.heldout.fraction) * total)))
        if cfg.eval.heldout.limit is not None:
            n = min(n, int(cfg.eval.heldout.limit))
        if n >= total:
            raise ValueError(f"eval.heldout.fraction={cfg.eval.heldout.fraction} leaves no training images "
                             f"({total} in data/); use a smaller fraction")
        first = total - n
        with ShardSetWriter(folder, shard_size, source=cfg.data.source, split=data_manifest.get("split"),
                            **common) as w:
            for i, s in enumerate(iter_samples(shard_paths(rd.data, data_manifest), decode=False)):
                if i >= first:
                    w.write(s["key"], None, s["label"], s.get("caption"), png=s["png"])
                    keys.append(s["key"])
            w.extra.update(keys_sha256=sha256_strings(keys), excluded_from_training=True,
                           note=f"the last {n} of {total} samples of data/ (experts and router trained on "
                                f"them; the feature net did not)")
    manifest = w.manifest
    log.debug("evaluate: held-out set (%s): %d images -> %s", mode, manifest["num_samples"], folder)
    return manifest


def _check_nonempty(keys, cfg) -> None:
    if not keys:
        raise ValueError(f"the held-out source (data.source={cfg.data.source}, split={cfg.eval.heldout.split}) "
                         f"gave no images; check eval.heldout.data")


def load_images(folder, limit: int | None = None, exclude: set | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """(uint8 images, int64 labels, keys) of a shard set, in stored order, skipping ``exclude`` keys."""
    images, labels, keys = [], [], []
    for s in iter_samples(shard_paths(folder)):
        if exclude and s["key"] in exclude:
            continue
        images.append(s["image"])
        labels.append(s["label"])
        keys.append(s["key"])
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise ValueError(f"no images in {folder}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), keys


def training_data_sha(rd: RunDir, heldout: dict, target: str, max_samples, seed: int) -> str:
    """A checksum of the feature net's training data, from manifests only (no image is read)."""
    data = load_manifest(rd.data)
    parts = dict(keys=data.get("keys_sha256"), shards=[s["sha256"] for s in data["shards"]],
                 excluded=heldout["keys_sha256"] if heldout.get("excluded_from_training") else None,
                 target=target, max_samples=max_samples, subsample_seed=seed)
    if target == "cluster":
        parts["clustering_id"] = read_json(rd.cluster_report)["clustering_id"]
    return sha256_strings([json.dumps(parts, sort_keys=True)])


def cluster_labels(rd: RunDir, keys: list, images: np.ndarray, seed: int) -> tuple[np.ndarray | None, str]:
    """The cluster of each image: ``(labels, how)``, or ``(None, why not)``.

    Images of ``data/`` have their cluster in ``clusters/assignments.npz``. Other
    images go where a training image would: embedded with the run's encoder,
    then to the coarse cluster of the nearest fine centroid (two-stage) or to
    the nearest centroid (flat). A random partition has no rule for new images.
    """
    from ddm.cluster import load_assignments

    report = read_json(rd.cluster_report)
    known = load_assignments(rd.assignments, int(report["k"])).cluster_of()
    if all(k in known for k in keys):
        return np.asarray([known[k] for k in keys], dtype=np.int64), "assignments"
    if report.get("method") == "random":
        return None, "random partition: an image outside data/ has no cluster"
    return _nearest_centroid(rd, report, images, seed), "nearest_centroid"


def _nearest_centroid(rd: RunDir, report: dict, images: np.ndarray, seed: int) -> np.ndarray:
    from ddm.cluster.kmeans import assign
    from ddm.data.sources import SourceMeta
    from ddm.embed import build_encoder, load_embeddings_manifest
    from ddm.seeds import seed_everything

    manifest = load_embeddings_manifest(rd.embeddings)
    seed_everything(seed)  # as the embed stage does: random-init encoders must match
    encoder = build_encoder(OmegaConf.create(manifest["encoder_config"]),
                            SourceMeta.from_manifest(load_manifest(rd.data)))
    emb = np.concatenate([encoder(images[i:i + 512]) for i in range(0, len(images), 512)])
    spherical = bool(report.get("spherical"))
    fine_path = rd.clusters / "fine_centroids.npy"
    if fine_path.exists():
        fine, _ = assign(emb, np.load(fine_path), spherical=spherical)
        return np.load(rd.clusters / "fine_to_coarse.npy")[fine].astype(np.int64)
    labels, _ = assign(emb, np.load(rd.clusters / "centroids.npy"), spherical=spherical)
    return labels.astype(np.int64)
