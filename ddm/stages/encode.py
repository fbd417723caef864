"""Stage ``encode`` (latent runs): every partition's images as VAE latents, under ``latents/cluster-KK/``.

    ddm encode name=big vae=sd vae.pretrained=/weights/sd-vae-ft-ema

Runs after ``partition``: the clusters come from the images, and each island
can encode its own partition on its own GPU. For each cluster it writes a
shard set with the partition's samples in the same order and with the same
keys, each holding the posterior mean of its latent, scaled by the VAE's
factors (``npy``, float16 [C, h, w]; with ``vae.flip`` also the mirrored
image's, ``flip.npy``, which training takes half of the time), its label and caption; the manifest
records the VAE's identity (``ddm.latent.vae_identity``), the latent shape
(as ``channels`` / ``image_size``, which the experts read) and the pixel shape
(``image_channels`` / ``pixel_size``, which decoding restores). A cluster
whose latents were made from the same partition with the same VAE is skipped;
after a reclustering or with another VAE it is encoded again. A partition
folder that is not the index's clustering (left from another one, or copied
from another run) is refused, and the pixels of a partition that is encoded are
first checked against its manifest (``latents/verified.json`` keeps what was
checked, so unchanged shards are not read twice).

With ``text.store=true`` (text runs) each sample also holds its caption's
encoding by the run's text tower, computed here once: the caption's tokens
only (``txt_tokens.npy``, float16 [n, D], n <= the tower's context length)
and the pooled vector (``txt_pooled.npy``); the manifest records the tower
(``text``: model, weights sha256), and training reads these instead of
running the tower. It needs a latent run: pixel shards are not rewritten.

With ``vae=none`` the stage has nothing to do and says so.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.data.shards import MANIFEST, ShardSetWriter, iter_samples, load_manifest, shard_paths
from ddm.data.verified import check_recorded
from ddm.devices import resolve_device
from ddm.errors import MissingInput
from ddm.images import batch_to_model_space
from ddm.io import read_json, sha256_strings
from ddm.latent.run_latents import current_identity, same_text, same_vae, stored_text_of, vae_spec
from ddm.latent.vae import LatentCodec
from ddm.lineage import check_partition
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.text.encoder import OpenClipTextEncoder
from ddm.text.spec import captions_for, stored_text_spec

log = logging.getLogger("ddm")


def run(cfg: Settings) -> dict:
    rd = RunDir(cfg.run_dir)
    spec = vae_spec(cfg)
    text = stored_text_spec(cfg)
    if spec is None:
        log.info("encode: vae=none, nothing to encode: experts train on pixels")
        return StageResult(dict(stage="encode", vae=None, clusters=[]), skipped=True)
    if not rd.partitions_index.exists():
        raise MissingInput(f"no partitions at {rd.partitions}: run `ddm partition` first")
    index = read_json(rd.partitions_index)
    k = int(index["num_clusters"])
    identity = current_identity(spec)
    codec, done, encoded = None, [], []
    for i in range(k):
        partition = load_manifest(rd.partition(i))
        # a partition folder left from another clustering (or copied from another run) is not encoded as this one
        check_partition(partition, i, index, rd.partition_manifest(i), rd.partitions_index)
        out = rd.latent(i)
        if (out / MANIFEST).exists() and not cfg.redo:
            existing = read_json(out / MANIFEST)
            flip = bool(cfg.vae.flip)
            if (
                existing.get("keys_sha256") == partition["keys_sha256"]
                and existing.get("clustering_id") == partition.get("clustering_id")
                and same_vae(existing.get("vae"), identity)
                and bool(existing.get("flip", False)) == flip
                and same_text(stored_text_of(existing), text)
            ):
                done.append(i)
                continue
        if codec is None:
            device = resolve_device(cfg.vae.device, "vae.device")
            codec = LatentCodec.load(spec["pretrained"], spec["allow_download"]).to(device)
            if text is not None:
                tower = OpenClipTextEncoder(text["model"], text["pretrained"], device=device, cache=int(text["cache"]))
        # the latents' checksums are computed from what is read here: show the pixels are the partition's first
        check_recorded(rd.partition(i), partition, rd.latents / "verified.json")
        writer_text = None if text is None else (tower, captions_for(cfg, partition))
        _encode_partition(rd, i, partition, codec, int(cfg.vae.batch_size), bool(cfg.vae.flip), writer_text)
        encoded.append(i)
    log.info("encode: clusters %s encoded, %s already done -> %s", encoded, done, rd.latents)
    summary = dict(stage="encode", vae=dict(identity, source=spec["pretrained"]), encoded=encoded, done=done)
    return StageResult(summary, skipped=not encoded)


def _encode_partition(
    rd: RunDir, k: int, partition: dict, codec: LatentCodec, batch_size: int, flip: bool, text=None
) -> None:
    """``text``: ``(tower, captions)`` to store each sample's caption encoding too, or None."""
    out = rd.latent(k)
    if out.exists():
        shutil.rmtree(out)  # the manifest goes with it: never a stale complete-looking set
    shape = codec.latent_shape(int(partition["channels"]), int(partition["image_size"]))
    device = next(codec.parameters()).device
    extra = {
        key: partition[key] for key in ("num_classes", "class_names", "clustering_id", "cluster") if key in partition
    }
    keys: list[str] = []
    with ShardSetWriter(
        out,
        int(partition["shards"][0]["num_samples"]) if partition["shards"] else 1,
        channels=shape[0],
        image_size=shape[1],
        image_channels=int(partition["channels"]),
        pixel_size=int(partition["image_size"]),
        vae=codec.identity(),
        latent_dtype="float16",
        flip=flip,  # each sample also holds its mirrored image's latent (flip.npy); training takes either
        **extra,
        **({} if text is None else dict(text=_text_record(text[0]))),
    ) as writer:
        batch: list[dict] = []
        for sample in iter_samples(shard_paths(rd.partition(k), partition)):
            batch.append(sample)
            if len(batch) == batch_size:
                _write_batch(writer, batch, codec, device, keys, flip, text)
                batch = []
        if batch:
            _write_batch(writer, batch, codec, device, keys, flip, text)
        writer.extra["keys_sha256"] = sha256_strings(keys)  # equal to the partition's: same keys, same order
    log.info("encode: cluster %d, %d samples -> %s %s", k, len(keys), "x".join(map(str, shape)), out)


def _text_record(tower: OpenClipTextEncoder) -> dict:
    """What a shard set's manifest says of the tower its caption encodings came from."""
    spec = tower.spec
    return dict(
        model=spec["model"],
        pretrained=spec["pretrained"],
        weights_sha256=spec["weights_sha256"],
        **({"init_seed": spec["init_seed"]} if "init_seed" in spec else {}),
        dim=tower.dim,
        context_length=tower.context_length,
        dtype="float16",
    )


def _text_arrays(batch, text) -> list[dict]:
    """Each sample's caption encoding: the caption's own tokens (padding cut off) and the pooled vector."""
    tower, captions = text
    encoded = tower([captions(s.get("caption"), s["label"], s["key"]) for s in batch])
    tokens = encoded.tokens.cpu().numpy().astype(np.float16)
    lengths = encoded.mask.sum(1).tolist()
    pooled = encoded.pooled.cpu().numpy().astype(np.float16)
    return [{"txt_tokens.npy": tokens[i, : int(n)], "txt_pooled.npy": pooled[i]} for i, n in enumerate(lengths)]


def _write_batch(
    writer: ShardSetWriter, batch, codec: LatentCodec, device, keys: list[str], flip: bool, text=None
) -> None:
    x = batch_to_model_space(np.stack([s["image"] for s in batch])).to(device)

    def encoded(images):
        with torch.no_grad():
            return codec.encode(images).float().cpu().numpy().astype(np.float16)

    latents = encoded(x)
    mirrored = encoded(x.flip(-1)) if flip else [None] * len(batch)
    texts = _text_arrays(batch, text) if text is not None else [{}] * len(batch)
    for sample, latent, other, stored in zip(batch, latents, mirrored, texts):
        arrays = dict(npy=latent) if other is None else {"npy": latent, "flip.npy": other}
        arrays.update(stored)
        writer.write(sample["key"], None, sample["label"], sample.get("caption"), arrays=arrays)
        keys.append(sample["key"])
