"""Stage ``embed``: one L2-normalised embedding per data sample, stored shard by shard.

For data shard NNNNNN it writes ``embeddings/emb-NNNNNN.npy`` (float32
[n, dim], row i = sample i of the shard) and ``keys-NNNNNN.txt``, then
``manifest.json`` last (see ``ddm.embed`` for the layout). Shards are streamed
one at a time, so memory holds one shard's images at most.

The data shards are checked against data/manifest.json first (only the ones
changed since the last check are read: ``embeddings/verified.json``). The
manifest records each file's sha256, the data it was computed from
(``data_shards_sha256``) and ``embeddings_id``, a digest of the embeddings'
bytes and keys that the clustering report copies, so that later stages can tell
embeddings of other data, or a clustering of other embeddings.

Resumable: a shard whose files exist with the right count, dimension and
first/last key is not recomputed. ``encoder.json`` records the encoder and the
data shards' checksums; if either changed since the files were written, all
per-shard files are discarded first, so a resumed run never mixes encoders.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths, shards_digest
from ddm.data.sources import SourceMeta
from ddm.data.verified import check_recorded
from ddm.embed import build_encoder, embedding_file, embeddings_id, keys_file, load_embeddings_manifest
from ddm.errors import BadInput, Unusable
from ddm.io import atomic_path, read_json, sha256_file, sha256_strings, write_json, write_text
from ddm.seeds import seed_everything
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with, done_already

log = logging.getLogger("ddm")

FINGERPRINT = "encoder.json"


def _clear_shard_files(folder: Path) -> None:
    for path in list(folder.glob("emb-*.npy")) + list(folder.glob("keys-*.txt")):
        path.unlink()


def _reset_if_changed(folder: Path, fingerprint: dict) -> None:
    """Drop per-shard files written by another encoder or for other data, then record ours.

    Data that only grew by shards appended after the old ones (``ddm extend``)
    keeps the old shards' files: only the new shards are embedded.
    """
    path = folder / FINGERPRINT
    if path.exists() and not _same_or_grown(read_json(path), fingerprint):
        log.info(f"embed: encoder or data changed since {folder} was written; recomputing every shard")
        _clear_shard_files(folder)
    write_json(path, fingerprint)


def _same_or_grown(recorded: dict, now: dict) -> bool:
    """The same encoder and seed, and the recorded data shards are the first of the current ones."""
    old, new = recorded.get("data_shards") or [], now["data_shards"]
    same_encoder = {k: v for k, v in recorded.items() if k != "data_shards"} == {
        k: v for k, v in now.items() if k != "data_shards"
    }
    return same_encoder and new[: len(old)] == old


def _shard_done(emb_path: Path, keys_path: Path, entry: dict, dim: int) -> bool:
    if not (emb_path.exists() and keys_path.exists()):
        return False
    try:
        shape = np.load(emb_path, mmap_mode="r").shape
    except (ValueError, OSError):  # a foreign or damaged file: recompute it
        return False
    keys = keys_path.read_text().splitlines()
    return (
        shape == (entry["num_samples"], dim)
        and len(keys) == entry["num_samples"]
        and keys[0] == entry["first_key"]
        and keys[-1] == entry["last_key"]
    )


@torch.no_grad()
def embed_shard(encoder, path: str, batch_size: int) -> tuple[list[str], np.ndarray]:
    """Keys and embeddings of one shard's samples, in stored order, encoded ``batch_size`` at a time."""
    keys: list[str] = []
    rows: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for sample in iter_samples([path]):
        keys.append(sample["key"])
        batch.append(sample["image"])
        if len(batch) == batch_size:
            rows.append(encoder(np.stack(batch)))
            batch = []
    if batch:
        rows.append(encoder(np.stack(batch)))
    emb = np.concatenate(rows) if rows else np.zeros((0, encoder.dim), np.float32)
    return keys, emb.astype(np.float32, copy=False)


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


# Embed settings that change how fast embeddings are made, not what they are.
SPEED_ONLY = ("device", "batch_size")


def _result_settings(encoder_config: dict | None) -> dict | None:
    """The encoder settings the embeddings depend on, under ``embed.`` (None: recorded by none)."""
    if encoder_config is None:
        return None
    return {"embed": {k: v for k, v in encoder_config.items() if k not in SPEED_ONLY}}


def run(cfg: Settings) -> dict:
    """Embed every sample of ``<run_dir>/data`` with ``cfg.embed``'s encoder into ``<run_dir>/embeddings``."""
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

    data = load_manifest(run_dir.data)
    # Every image is read below: first show that data/ is what its manifest says (a changed shard would
    # be embedded as it is now, and the partitions copied from it later would pass their own checksums).
    check_recorded(run_dir.data, data, folder / "verified.json")
    seed_everything(int(cfg.seed))  # random-init encoders must come out the same on a resumed run
    encoder = build_encoder(cfg.embed, SourceMeta.from_manifest(data))
    folder.mkdir(parents=True, exist_ok=True)
    run_dir.embeddings_manifest.unlink(missing_ok=True)
    if cfg.redo:
        _clear_shard_files(folder)
    _reset_if_changed(
        folder, dict(encoder=encoder.spec, seed=int(cfg.seed), data_shards=[s["sha256"] for s in data["shards"]])
    )

    batch_size = int(cfg.embed.batch_size)
    shards, all_keys, computed = [], [], 0
    paths = shard_paths(run_dir.data, data)
    for index, (entry, path) in enumerate(
        tqdm(list(zip(data["shards"], paths)), desc="embed", unit="shard", disable=None)
    ):
        emb_path, keys_path = folder / embedding_file(index), folder / keys_file(index)
        if _shard_done(emb_path, keys_path, entry, encoder.dim):
            keys = keys_path.read_text().splitlines()
        else:
            keys, emb = embed_shard(encoder, path, batch_size)
            if len(keys) != entry["num_samples"]:
                raise BadInput(
                    f"{path} holds {len(keys)} samples but data/manifest.json says "
                    f"{entry['num_samples']}; the data changed: rerun prepare with redo=true"
                )
            _write_shard(folder, index, keys, emb)
            computed += 1
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
        encoder=encoder.name,
        encoder_config=cfg.embed.to_dict(),
        encoder_spec=encoder.spec,
        dim=encoder.dim,
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
        f"embed: {len(all_keys)} x {encoder.dim} ({encoder.name}) in {len(shards)} shards -> {folder} "
        f"({computed} computed, {len(shards) - computed} reused)"
    )
    return _summary(manifest, folder, skipped=False, computed=computed)
