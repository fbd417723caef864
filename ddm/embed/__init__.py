"""Image embeddings used to partition the data: encoders, and reading the ``embed`` stage's files.

Layout of ``<run>/embeddings/`` (written by ``ddm.stages.embed``)::

    emb-NNNNNN.npy    float32 or float16 (``embed.dtype``) [n, dim], L2-normalised
                      rows; row i is sample i of data shard NNNNNN in stored order
    keys-NNNNNN.txt   the n sample keys of that shard, one per line, same order
    encoder.json      which encoder (and data) the per-shard files came from
    verified.json     which data shards were checked (``ddm.data.verified``)
    parts/            while ``embed.parts`` jobs write the files: each part's record and
                      checked shards (``ddm.embed.parts``); the merge removes it
    manifest.json     written last: encoder, encoder_config, dim, dtype, num_samples,
                      shards [{embeddings, keys, num_samples, data_shard, sha256}],
                      keys_sha256 (copied from data/manifest.json),
                      data_shards_sha256 (``ddm.data.shards.shards_digest`` of
                      data/manifest.json) and embeddings_id (``embeddings_id``)

``ddm.stages.cluster.load_embeddings`` reads them back memory-mapped, shard by shard
(``ddm.cluster.rows.Rows``), a block at a time in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

from ddm.data.shards import shards_digest
from ddm.embed.registry import ENCODERS, Encoder, OpenClipEncoder, PixelEncoder, TorchvisionEncoder, build_encoder
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, sha256_strings

__all__ = [
    "ENCODERS",
    "Encoder",
    "OpenClipEncoder",
    "PixelEncoder",
    "TorchvisionEncoder",
    "build_encoder",
    "check_embeddings_of_data",
    "embedding_file",
    "embeddings_id",
    "keys_file",
    "load_embeddings_manifest",
]


def embedding_file(index: int) -> str:
    """File name of the embeddings of data shard ``index``."""
    return f"emb-{index:06d}.npy"


def keys_file(index: int) -> str:
    """File name of the keys of data shard ``index``."""
    return f"keys-{index:06d}.txt"


def load_embeddings_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise MissingInput(f"no embeddings manifest at {path}: run the embed stage first (ddm embed)")
    return read_json(path)


def embeddings_id(manifest: dict) -> str | None:
    """16 hex characters naming a set of embeddings by its bytes and keys: what a clustering was computed from.

    The clustering report copies it, so the partition stage can refuse a clustering of other
    embeddings (embedded again since, with another encoder or for other data). None for a manifest
    written before embeddings recorded their checksums.
    """
    shards = manifest.get("shards") or []
    if not shards or not all("sha256" in s for s in shards):
        return None
    return sha256_strings([manifest.get("keys_sha256"), *(s["sha256"] for s in shards)])[:16]


def check_embeddings_of_data(manifest: dict, data_manifest: dict, where) -> None:
    """Refuse embeddings computed for other data than data/manifest.json: other keys, or the same keys with other
    images (data prepared again since). Manifests from before ``data_shards_sha256`` are judged by their keys."""
    data_sha = data_manifest.get("keys_sha256")
    if data_sha is not None and manifest.get("keys_sha256") != data_sha:
        raise BadInput(
            f"embeddings in {where} were computed for different data (keys_sha256 "
            f"{manifest.get('keys_sha256')} != data's {data_sha}): rerun embed with redo=true"
        )
    made_from, now = manifest.get("data_shards_sha256"), shards_digest(data_manifest)
    if made_from is not None and made_from != now:
        raise BadInput(
            f"embeddings in {where} were computed from other data shards (data_shards_sha256 {made_from[:12]}...) "
            f"than data/manifest.json lists now ({now[:12]}...): the same keys were prepared again with other "
            f"images; rerun embed with redo=true"
        )
