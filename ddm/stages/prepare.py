"""Stage ``prepare``: shard the whole dataset into ``<run>/data/`` as webdataset tars.

Reads the source named by ``cfg.data.source`` (see ``ddm.data.sources``) and
writes ``shard-NNNNNN.tar`` files of ``cfg.data.shard_size`` samples, then
``manifest.json`` with the shard list and, besides the shard-set fields::

    source, split, image_size, channels, num_classes, class_names,
    order         # {"permuted": "samples" | "shards", "seed": the run's seed}
    keys_sha256   # ddm.io.sha256_strings of every key in stored order
    num_skipped   # unreadable images left out under data.on_error=skip (0 otherwise)

With ``data.on_error=skip``, the images that could not be decoded are listed,
each with its reason, in ``skipped.json`` beside the manifest (written only when
there are some)::

    {"num_skipped": 2, "skipped": [{"file": "/data/cats/03.png", "reason": "empty file (0 bytes), ..."}, ...]}

Samples are stored in a permutation drawn from the run's ``seed`` (the same seed
gives the same shards, byte for byte): a folder sorted by class must not reach
the training loader, whose shuffle buffer is small next to a class, in class
order. ``order.permuted`` is ``samples`` when every sample was permuted and
``shards`` when only the input shards of a streamed source were (see
``ddm.data.sources.order``); a manifest without ``order`` is in source order.

Later stages get the dataset's metadata with
``SourceMeta.from_manifest(load_manifest(RunDir(cfg.run_dir).data))`` and can
check they still see the same samples by comparing ``keys_sha256``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from ddm.artifacts import RunDir
from ddm.data.shards import MANIFEST, ShardSetWriter, load_manifest
from ddm.data.sources import open_source
from ddm.data.sources.decode import DEFAULT_BACKGROUND, DEFAULT_ON_ERROR
from ddm.errors import BadInput
from ddm.io import sha256_strings, write_json
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with, done_already

log = logging.getLogger("ddm")

SKIPPED = "skipped.json"


def _clear(folder: Path) -> None:
    """Remove an earlier shard set: the manifest first, so the folder never looks complete meanwhile."""
    (folder / MANIFEST).unlink(missing_ok=True)
    (folder / SKIPPED).unlink(missing_ok=True)
    for path in list(folder.glob("shard-*.tar")) + list(folder.glob(".shard-*.tar.tmp")):
        path.unlink()


def _summary(manifest: dict, folder: Path, skipped: bool) -> dict:
    return dict(
        stage="prepare",
        path=str(folder),
        skipped=skipped,
        num_samples=manifest["num_samples"],
        num_shards=len(manifest["shards"]),
        source=manifest["source"],
        split=manifest["split"],
        image_size=manifest["image_size"],
        channels=manifest["channels"],
        num_classes=manifest["num_classes"],
        num_skipped=manifest.get("num_skipped", 0),
    )


def made_with(cfg: Settings) -> dict:
    """The settings the prepared shards depend on: the data's, and the seed (a subset, a shuffled order)."""
    return dict(data=cfg.data.to_dict(), seed=int(cfg.seed))


def _recorded(settings: dict | None) -> dict | None:
    """The settings a manifest records, with the data keys added since at the values that behave as before.

    ``data.on_error`` and ``data.background`` came later; a manifest made before them was made with an
    unreadable image stopping the run (``raise``), and is kept rather than refused for lacking the keys.
    (Transparent images were then stored with their alpha dropped: ``redo=true`` composites them.)
    """
    if not settings or not isinstance(settings.get("data"), dict):
        return settings
    data = dict(settings["data"])
    data.setdefault("on_error", DEFAULT_ON_ERROR)
    data.setdefault("background", list(DEFAULT_BACKGROUND))
    return {**settings, "data": data}


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _outcome(manifest: dict, folder: Path, not_images: int = 0) -> str:
    """The log line's end: shards written, images skipped, files that were not images."""
    line = f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards -> {folder}"
    skipped = manifest.get("num_skipped", 0)
    if skipped:
        line += f"; {_count(skipped, 'unreadable image')} skipped, listed in {folder / SKIPPED}"
    if not_images:
        line += f"; {_count(not_images, 'file')} in data.root not read, not being images by their extension"
    return line


def run(cfg: Settings) -> dict:
    """Write every sample of ``cfg.data`` into shards under ``<run_dir>/data``; return a summary."""
    folder = RunDir(cfg.run_dir).data
    if done_already(folder / MANIFEST, cfg):
        manifest = load_manifest(folder)
        check_made_with("prepare", folder, _recorded(manifest.get("settings")), made_with(cfg))
        log.info(f"prepare: {_outcome(manifest, folder)} (already there; redo=true rebuilds)")
        return StageResult(_summary(manifest, folder, skipped=True), skipped=True)

    # Open (and so validate) the source before touching an earlier result.
    source = open_source(cfg.data, int(cfg.seed))
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)
    keys: list[str] = []
    with ShardSetWriter(
        folder,
        int(cfg.data.shard_size),
        source=cfg.data.source,
        split=source.split,
        order=source.order.as_dict(),
        # data.classes: the class ids kept (null: all), so a run on some classes says so
        classes=None if cfg.data.classes is None else sorted(int(c) for c in cfg.data.classes),
        **source.meta.as_dict(),
    ) as writer:
        for sample in tqdm(source.samples, desc="prepare", unit="img", disable=None):
            if source.meta.num_classes and sample.label < 0:
                # A class-conditional expert would look this label up in its embedding table: on a GPU
                # that is a device-side assert hours into training. Refuse it here, naming the sample.
                raise BadInput(
                    f"{sample.origin} has no label (-1) but the data has {source.meta.num_classes} classes: "
                    f"label every sample, or set data.num_classes=0 to train unconditional experts"
                )
            writer.write(sample.key, sample.image, sample.label, sample.caption)
            keys.append(sample.key)
        skipped = sorted(source.skipped.records, key=lambda r: r["file"])
        if not keys:
            unreadable = f" ({len(skipped)} unreadable images skipped, e.g. {skipped[0]['file']})" if skipped else ""
            raise BadInput(f"data.source={cfg.data.source} gave no samples{unreadable}; check data.root / data.urls")
        if skipped:  # before the manifest, which marks the folder complete
            write_json(folder / SKIPPED, dict(num_skipped=len(skipped), skipped=skipped))
        # The writer puts its extra fields into the manifest when the block closes.
        writer.extra["keys_sha256"] = sha256_strings(keys)
        writer.extra["num_skipped"] = len(skipped)
        writer.extra["settings"] = made_with(cfg)  # a rerun with other settings is refused, not skipped
    manifest = writer.manifest
    log.info(f"prepare: {_outcome(manifest, folder, source.not_images)}")
    return _summary(manifest, folder, skipped=False)
