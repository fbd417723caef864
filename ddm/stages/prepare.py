"""Stage ``prepare``: shard the whole dataset into ``<run>/data/`` as webdataset tars.

Reads the source named by ``cfg.data.source`` (see ``ddm.data.sources``), split into units
that depend on the source, the seed and ``data.shard_size`` alone, and writes unit ``i`` as
``shard-NNNNNN.tar`` (``ddm.data.ingest``): in ``data.workers`` processes, or as ``data.parts``
jobs (``data.part=J`` each) merged by a last ``ddm prepare data.parts=N``. The shards are the
same bytes whichever way. Then ``manifest.json``, last, with the shard list and, besides the
shard-set fields::

    source, split, image_size, channels, num_classes, class_names, classes,
    image_format, quality  # how images are stored (quality: JPEG only)
    num_passed_through     # images stored as the source's own bytes (no resize or conversion needed)
    order         # {"permuted": "samples" | "shards", "seed": the run's seed}
    keys_sha256   # ddm.io.sha256_strings of every key in stored order
    num_skipped   # unreadable images left out under data.on_error=skip (0 otherwise)
    settings      # the data settings and seed it was made with (speed-only ones left out)

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
import shutil
from pathlib import Path

from tqdm import tqdm

from ddm.artifacts import RunDir
from ddm.data.ingest import (
    PARTS,
    Merged,
    StoreOptions,
    merge_parts,
    part_path,
    part_units,
    resolve_workers,
    shard_name,
    write_part,
    write_units,
)
from ddm.data.ingest.parts import check_parts, part_done, units_digest
from ddm.data.shards import MANIFEST, load_manifest
from ddm.data.sources import open_source
from ddm.data.sources.decode import DEFAULT_BACKGROUND, DEFAULT_ON_ERROR
from ddm.errors import BadInput
from ddm.io import write_json
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with, done_already

log = logging.getLogger("ddm")

SKIPPED = "skipped.json"


def _clear(folder: Path, shard_names: list[str] | None = None) -> None:
    """Remove an earlier shard set (or, given ``shard_names``, one part's shards and record): the manifest
    first, so the folder never looks complete meanwhile."""
    (folder / MANIFEST).unlink(missing_ok=True)
    if shard_names is not None:
        for name in shard_names:
            (folder / name).unlink(missing_ok=True)
            (folder / f".{name}.tmp").unlink(missing_ok=True)
        return
    (folder / SKIPPED).unlink(missing_ok=True)
    for path in list(folder.glob("shard-*.tar")) + list(folder.glob(".shard-*.tar.tmp")):
        path.unlink()
    if (folder / PARTS).is_dir():
        shutil.rmtree(folder / PARTS)


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


# Data settings that change how fast and by whom the shards are written, not what they hold.
SPEED_ONLY = ("workers", "parts", "part")


def made_with(cfg: Settings) -> dict:
    """The settings the prepared shards depend on: the data's, and the seed (a subset, a shuffled order)."""
    data = {k: v for k, v in cfg.data.to_dict().items() if k not in SPEED_ONLY}
    if data.get("image_format") == "png":
        data.pop("quality", None)  # lossless: the JPEG quality changes nothing
    return dict(data=data, seed=int(cfg.seed))


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
    data.setdefault("image_format", "png")  # every image was stored as PNG before the setting existed
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
    """Write every sample of ``cfg.data`` into shards under ``<run_dir>/data``; return a summary.

    With ``data.parts=N`` and ``data.part=J`` this job writes part J's shards only and records them;
    with ``data.parts=N`` alone it merges the parts their own jobs wrote into the manifest (it writes none).
    """
    folder = RunDir(cfg.run_dir).data
    if done_already(folder / MANIFEST, cfg):
        manifest = load_manifest(folder)
        check_made_with("prepare", folder, _recorded(manifest.get("settings")), made_with(cfg))
        log.info(f"prepare: {_outcome(manifest, folder)} (already there; redo=true rebuilds)")
        return StageResult(_summary(manifest, folder, skipped=True), skipped=True)

    # Open (and so validate) the source before touching an earlier result.
    source = open_source(cfg.data, int(cfg.seed))
    options = StoreOptions(cfg.data.image_format, int(cfg.data.quality))
    parts, part = int(cfg.data.parts), cfg.data.part
    check_parts(parts, part, source.limit is not None)
    workers = resolve_workers(cfg.data.workers)
    folder.mkdir(parents=True, exist_ok=True)
    if parts == 1:
        _clear(folder)
        merged = Merged()
        for result in _progress(
            write_units(folder, enumerate(source.units), source.reader, options, workers, source.limit),
            len(source.units),
        ):
            merged.add(result)
        return _finish(cfg, folder, source, options, merged)

    about = dict(settings=made_with(cfg), num_units=len(source.units), units_sha256=units_digest(source.units))
    if part is None:  # the merge: the parts were written by their own jobs, maybe still running; write none here
        merged = merge_parts(folder, parts, len(source.units), about)
        summary = _finish(cfg, folder, source, options, merged)
        shutil.rmtree(folder / PARTS)  # merged into the manifest, written first
        return summary
    j = int(part)
    if not cfg.redo and part_done(folder, j, parts, about):
        log.info(f"prepare: part {j} of {parts} done already ({part_path(folder, j, parts)}); redo=true rewrites it")
        return StageResult(_part_summary(folder, j, parts, skipped=True), skipped=True)
    span = part_units(len(source.units), parts, j)
    part_path(folder, j, parts).unlink(missing_ok=True)
    _clear(folder, [shard_name(i) for i in span])
    units = [(i, source.units[i]) for i in span]
    results = list(_progress(write_units(folder, units, source.reader, options, workers), len(units)))
    path = write_part(folder, j, parts, about, results)
    log.info(
        f"prepare: part {j} of {parts}: {sum(len(r.keys) for r in results)} samples in units "
        f"{span.start}..{span.stop - 1} -> {path}; once every part is done, `ddm prepare data.parts={parts}` merges"
    )
    return _part_summary(folder, j, parts, skipped=False)


def _part_summary(folder: Path, part: int, parts: int, skipped: bool) -> dict:
    record = str(part_path(folder, part, parts))
    return dict(stage="prepare", path=str(folder), skipped=skipped, part=part, parts=parts, record=record)


def _progress(results, total: int):
    return tqdm(results, total=total, desc="prepare", unit="shard", disable=None)


def _finish(cfg: Settings, folder: Path, source, options: StoreOptions, merged: Merged) -> dict:
    """The skipped list, then the manifest (last: it marks data/ complete); the stage's summary."""
    skipped = sorted(merged.skipped, key=lambda r: r["file"])
    if not merged.num_samples:
        unreadable = f" ({len(skipped)} unreadable images skipped, e.g. {skipped[0]['file']})" if skipped else ""
        raise BadInput(f"data.source={cfg.data.source} gave no samples{unreadable}; check data.root / data.urls")
    (folder / SKIPPED).unlink(missing_ok=True)
    if skipped:
        write_json(folder / SKIPPED, dict(num_skipped=len(skipped), skipped=skipped))
    manifest = dict(
        num_samples=merged.num_samples,
        shards=merged.shards,
        source=cfg.data.source,
        split=source.split,
        order=source.order.as_dict(),
        # data.classes: the class ids kept (null: all), so a run on some classes says so
        classes=None if cfg.data.classes is None else sorted(int(c) for c in cfg.data.classes),
        **source.meta.as_dict(),
        image_format=options.image_format,
        **({"quality": options.quality} if options.image_format == "jpeg" else {}),
        num_passed_through=merged.passed_through,  # stored as the source's own bytes
        keys_sha256=merged.keys.hexdigest(),
        num_skipped=len(skipped),
        settings=made_with(cfg),  # a rerun with other settings is refused, not skipped
    )
    write_json(folder / MANIFEST, manifest)
    log.info(f"prepare: {_outcome(manifest, folder, source.not_images)}")
    return _summary(manifest, folder, skipped=False)
