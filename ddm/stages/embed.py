"""Stage ``embed``: one L2-normalised embedding per data sample, stored shard by shard.

For data shard NNNNNN it writes ``embeddings/emb-NNNNNN.npy`` ([n, dim] of
``embed.dtype``, float32 or float16; row i = sample i of the shard) and
``keys-NNNNNN.txt``, then ``manifest.json`` last (see ``ddm.embed`` for the
layout). ``embed.workers`` loader processes decode the shards and the main
process encodes them ``embed.batch_size`` at a time (``ddm.embed.reader``):
the rows are the same bytes whatever the number of workers, and memory never
holds a whole shard's images.

The data shards are checked against data/manifest.json first (only the ones
changed since the last check are read: ``embeddings/verified.json``). The
manifest records each file's sha256, the data it was computed from
(``data_shards_sha256``) and ``embeddings_id``, a digest of the embeddings'
bytes and keys that the clustering report copies, so that later stages can tell
embeddings of other data, or a clustering of other embeddings.

Resumable: a shard whose files exist with the right count, dimension, dtype and
first/last key is not recomputed. ``encoder.json`` records the encoder and the
data shards' checksums; if either changed since the files were written, all
per-shard files are discarded first, so a resumed run never mixes encoders.

In parts (``embed.parts=N``, ``ddm.embed.parts``): ``embed.part=J`` embeds the
data shards of part J only (checking those alone against data/manifest.json,
recorded in ``parts/verified-part-JJJJ-of-NNNN.json``) and writes no manifest;
several parts run at once, each deleting none but its own shards' files. Then
``embed.parts=N`` alone computes nothing: it refuses while a part is not done
and otherwise writes the manifest one job would have written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddm.artifacts import RunDir
from ddm.data.ingest.parts import part_units
from ddm.data.shards import load_manifest, shard_paths, shards_digest
from ddm.data.sources import SourceMeta
from ddm.data.verified import check_recorded
from ddm.embed import build_encoder, embedding_file, embeddings_id, keys_file, load_embeddings_manifest
from ddm.embed.parts import (
    check_parts,
    merge_command,
    merge_records,
    reset_all,
    reset_part,
    verified_path,
    write_fingerprint,
    write_record,
)
from ddm.embed.reader import embed_shards, loader_workers
from ddm.errors import BadInput, MissingInput, Unusable, some_of
from ddm.io import atomic_path, sha256_file, sha256_strings, write_json, write_text
from ddm.seeds import seed_everything
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with, done_already

log = logging.getLogger("ddm")


def _shard_done(folder: Path, index: int, entry: dict, dim: int, dtype: np.dtype) -> bool:
    emb_path, keys_path = folder / embedding_file(index), folder / keys_file(index)
    if not (emb_path.exists() and keys_path.exists()):
        return False
    try:
        stored = np.load(emb_path, mmap_mode="r")
    except (ValueError, OSError):  # a foreign or damaged file: recompute it
        return False
    keys = keys_path.read_text().splitlines()
    return (
        stored.shape == (entry["num_samples"], dim)
        and stored.dtype == dtype
        and len(keys) == entry["num_samples"]
        and keys[0] == entry["first_key"]
        and keys[-1] == entry["last_key"]
    )


def _write_shard(folder: Path, index: int, keys: list[str], emb: np.ndarray) -> None:
    # Keys first, embeddings last: the .npy is what marks a shard as done.
    write_text(folder / keys_file(index), "\n".join(keys) + "\n")
    with atomic_path(folder / embedding_file(index)) as tmp:
        np.save(tmp, emb)


def _summary(manifest: dict, folder: Path, skipped: bool, computed: int = 0) -> dict:
    return dict(
        stage="embed",
        path=str(folder),
        skipped=skipped,
        encoder=manifest["encoder"],
        dim=manifest["dim"],
        num_samples=manifest["num_samples"],
        num_shards=len(manifest["shards"]),
        computed_shards=computed,
    )


# Embed settings that change how fast (and by how many jobs) embeddings are made, not what they are.
SPEED_ONLY = ("device", "batch_size", "workers", "parts", "part")
# Left out of the manifest's encoder_config: a merge of parts writes the manifest one job writes.
_JOBS = ("parts", "part")


def _result_settings(encoder_config: dict | None) -> dict | None:
    """The encoder settings the embeddings depend on, under ``embed.`` (None: recorded by none)."""
    if encoder_config is None:
        return None
    kept = {k: v for k, v in encoder_config.items() if k not in SPEED_ONLY}
    kept["dtype"] = stored_dtype(kept.get("dtype")).name  # embeddings from before embed.dtype are float32
    return {"embed": kept}


def stored_dtype(setting: str | None) -> np.dtype:
    """The dtype of the emb-*.npy files for ``embed.dtype`` (None: float32, as before the setting existed)."""
    return np.dtype(setting or "float32")


def run(cfg: Settings) -> dict:
    """Embed every sample of ``<run_dir>/data`` with ``cfg.embed``'s encoder into ``<run_dir>/embeddings``.

    With ``embed.parts=N`` and ``embed.part=J`` this job embeds part J's data shards only and writes no
    manifest; with ``embed.parts=N`` alone it computes nothing and merges the parts into the manifest.
    """
    run_dir = RunDir(cfg.run_dir)
    folder = run_dir.embeddings
    if done_already(run_dir.embeddings_manifest, cfg):
        manifest = load_embeddings_manifest(folder)
        check_made_with(
            "embed", folder, _result_settings(manifest.get("encoder_config")), _result_settings(cfg.embed.to_dict())
        )
        log.info(
            f"embed: {manifest['num_samples']} x {manifest['dim']} ({manifest['encoder']}) -> {folder} "
            f"(already there; redo=true recomputes)"
        )
        return StageResult(_summary(manifest, folder, skipped=True), skipped=True)

    # None: settings rebuilt from a manifest's encoder_config, which leaves the jobs out (``ddm extend``)
    parts, part = 1 if cfg.embed.parts is None else int(cfg.embed.parts), cfg.embed.part
    check_parts(parts, part)
    data = load_manifest(run_dir.data)
    if parts > 1 and part is None:
        return _merge(cfg, run_dir, data, parts)
    span = range(len(data["shards"])) if parts == 1 else part_units(len(data["shards"]), parts, int(part))
    # Every image is read below: first show that data/ is what its manifest says (a changed shard would
    # be embedded as it is now, and the partitions copied from it later would pass their own checksums).
    # A part checks its own shards only, and records them in its own file: N parts must neither read all
    # of data/ N times nor write one record together.
    if parts == 1:
        check_recorded(run_dir.data, data, folder / "verified.json")
    else:
        mine = dict(data, shards=data["shards"][span.start : span.stop])
        check_recorded(run_dir.data, mine, verified_path(folder, int(part), parts))
    seed_everything(int(cfg.seed))  # random-init encoders must come out the same on a resumed run
    encoder = build_encoder(cfg.embed, SourceMeta.from_manifest(data))
    folder.mkdir(parents=True, exist_ok=True)
    run_dir.embeddings_manifest.unlink(missing_ok=True)
    fingerprint = dict(encoder=encoder.spec, seed=int(cfg.seed), data_shards=[s["sha256"] for s in data["shards"]])
    if parts == 1:
        reset_all(folder, fingerprint, bool(cfg.redo))
    else:
        reset_part(folder, fingerprint, span, bool(cfg.redo))
        about = dict(name=encoder.name, dim=encoder.dim, made_with=_made_with(cfg))
        record = write_record(folder, int(part), parts, span, fingerprint, about)

    dtype = stored_dtype(cfg.embed.dtype)
    todo = _embed(cfg, run_dir, data, encoder, list(span), dtype)
    if parts > 1:
        shards = f"data shards {span.start}..{span.stop - 1}" if span else "no data shard (more parts than shards)"
        log.info(
            f"embed: part {part} of {parts}: {shards} ({len(todo)} computed, {len(span) - len(todo)} done already) "
            f"-> {folder}; once every part is done, `{merge_command(parts)}` merges them"
        )
        summary = dict(stage="embed", path=str(folder), part=int(part), parts=parts, record=str(record))
        return StageResult(dict(summary, skipped=not todo, computed_shards=len(todo)), skipped=not todo)
    return _write_manifest(cfg, run_dir, data, (encoder.name, encoder.dim, encoder.spec), computed=len(todo))


def _made_with(cfg: Settings) -> dict:
    """What a merge requires every part to have been made with: the embed settings the rows depend on, the seed."""
    return dict(_result_settings(cfg.embed.to_dict()), seed=int(cfg.seed))


def _embed(cfg: Settings, run_dir: RunDir, data: dict, encoder, span: list[int], dtype: np.dtype) -> list[int]:
    """Embed the shards of ``span`` that are not done yet; return their indices."""
    folder = run_dir.embeddings
    paths = shard_paths(run_dir.data, data)
    todo = [i for i in span if not _shard_done(folder, i, data["shards"][i], encoder.dim, dtype)]
    workers = loader_workers(cfg.embed.workers, len(todo))
    if todo:
        log.info(f"embed: {len(todo)} of {len(span)} shards to embed, {workers} loader workers decoding")
    done = embed_shards(encoder, [paths[i] for i in todo], int(cfg.embed.batch_size), workers)
    for position, keys, emb in tqdm(done, total=len(todo), desc="embed", unit="shard", disable=None):
        index = todo[position]
        if len(keys) != data["shards"][index]["num_samples"]:
            raise BadInput(
                f"{paths[index]} holds {len(keys)} samples but data/manifest.json says "
                f"{data['shards'][index]['num_samples']}; the data changed: rerun prepare with redo=true"
            )
        _write_shard(folder, index, keys, emb.astype(dtype, copy=False))
    return todo


def _merge(cfg: Settings, run_dir: RunDir, data: dict, parts: int) -> dict:
    """The manifest of the parts' files: computes nothing, reads no image (hashes each emb file for the manifest)."""
    folder = run_dir.embeddings
    spans = [part_units(len(data["shards"]), parts, j) for j in range(parts)]
    data_shards = [s["sha256"] for s in data["shards"]]
    records = merge_records(folder, parts, spans, data_shards, _made_with(cfg))
    dtype = stored_dtype(cfg.embed.dtype)
    not_done = [
        j
        for j, span in enumerate(spans)
        if j not in records
        or not all(_shard_done(folder, i, data["shards"][i], records[j]["dim"], dtype) for i in span)
    ]
    if not_done:
        shown = some_of(not_done)
        raise MissingInput(
            f"embed: parts {shown} of embed.parts={parts} are not done (part {not_done[0]}: data shards "
            f"{spans[not_done[0]].start}..{spans[not_done[0]].stop - 1}): run `ddm embed embed.parts={parts} "
            f"embed.part=J` for each, then `{merge_command(parts)}` again to merge"
        )
    first = records[0]
    summary = _write_manifest(cfg, run_dir, data, (first["name"], first["dim"], first["fingerprint"]["encoder"]))
    write_fingerprint(folder, first["fingerprint"])  # the whole folder's, now that the parts are one
    return summary


def _write_manifest(cfg: Settings, run_dir: RunDir, data: dict, encoder: tuple, computed: int = 0) -> dict:
    """The manifest (last: it marks embeddings/ complete) of every data shard's files; ``encoder``: name, dim, spec."""
    folder = run_dir.embeddings
    name, dim, spec = encoder
    dtype = stored_dtype(cfg.embed.dtype)
    shards, all_keys = [], []
    for index, entry in enumerate(data["shards"]):
        emb_path, keys_path = folder / embedding_file(index), folder / keys_file(index)
        keys = keys_path.read_text().splitlines()
        all_keys.extend(keys)
        shards.append(
            dict(
                embeddings=emb_path.name,
                keys=keys_path.name,
                num_samples=len(keys),
                data_shard=entry["path"],
                sha256=sha256_file(emb_path),  # the cluster stage reads the bytes this names
            )
        )

    # Later stages join embeddings to samples by position; make sure positions line up.
    if sha256_strings(all_keys) != data["keys_sha256"]:
        raise Unusable(f"keys in {folder} do not match data/manifest.json's keys_sha256: rerun embed with redo=true")
    manifest = dict(
        encoder=name,
        encoder_config={k: v for k, v in cfg.embed.to_dict().items() if k not in _JOBS},
        encoder_spec=spec,
        dim=dim,
        dtype=dtype.name,
        normalized="l2",
        num_samples=len(all_keys),
        shards=shards,
        keys_sha256=data["keys_sha256"],
        # which data these are: the same keys prepared again with other images is other data
        data_shards_sha256=shards_digest(data),
    )
    manifest["embeddings_id"] = embeddings_id(manifest)
    write_json(run_dir.embeddings_manifest, manifest)
    log.info(
        f"embed: {len(all_keys)} x {dim} ({name}) in {len(shards)} shards -> {folder} "
        f"({computed} computed, {len(shards) - computed} reused)"
    )
    return _summary(manifest, folder, skipped=False, computed=computed)
