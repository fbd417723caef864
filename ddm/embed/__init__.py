"""Image embeddings used to partition the data: encoders, and reading the ``embed`` stage's files.

Layout of ``<run>/embeddings/`` (written by ``ddm.stages.embed``)::

    emb-NNNNNN.npy    float32 [n, dim], L2-normalised rows; row i is sample i of
                      data shard NNNNNN in stored order
    keys-NNNNNN.txt   the n sample keys of that shard, one per line, same order
    encoder.json      which encoder (and data) the per-shard files came from
    manifest.json     written last: encoder, encoder_config, dim, num_samples,
                      shards [{embeddings, keys, num_samples, data_shard}],
                      keys_sha256 (copied from data/manifest.json)

``ddm.stages.cluster.load_embeddings`` reads them back into one matrix.
"""

from __future__ import annotations

import os
from pathlib import Path

from ddm.embed.encoders import ENCODERS, Encoder, OpenClipEncoder, PixelEncoder, TorchvisionEncoder, build_encoder
from ddm.errors import MissingInput
from ddm.io import read_json

__all__ = [
    "ENCODERS",
    "Encoder",
    "OpenClipEncoder",
    "PixelEncoder",
    "TorchvisionEncoder",
    "build_encoder",
    "embedding_file",
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
