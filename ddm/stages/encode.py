"""Stage ``encode`` (latent runs): every partition's images as VAE latents, under ``latents/cluster-KK/``.

    ddm encode name=big vae=sd vae.pretrained=/weights/sd-vae-ft-ema
    ddm encode name=big vae=sd vae.pretrained=/weights/sd-vae-ft-ema vae.clusters=3   # one island's partition

Runs after ``partition``: the clusters come from the images, and each island
can encode its own partition on its own GPU (``vae.clusters``: one id or a
list; null: every cluster). For each cluster it writes a
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
first checked against its manifest (``latents/cluster-KK.encode/verified.json``
keeps what was checked, so unchanged shards are not read twice).

Two encodes of one cluster never run at once: each holds the cluster's lock
(the experts' ``lock.json``) in ``latents/cluster-KK.encode/``, and a second one
refuses, naming the first; encodes of different clusters run side by side. A
cluster's latents are written into that folder and renamed into place once
whole (``ddm.launch.encode_job``), so a killed encode leaves the earlier set
intact, or none. Batches run in ``vae.precision`` (auto: bf16 autocast on a GPU,
fp32 on the CPU) and only the float16 latents come back to the host;
``vae.workers`` processes decode the stored images, with the same result
for any number of them.

With ``text.store=true`` (text runs) each sample also holds its caption's
encoding by the run's text tower, computed here once: the caption's tokens
only (``txt_tokens.npy``, float16 [n, D], n <= the tower's context length)
and the pooled vector (``txt_pooled.npy``); the manifest records the tower
(``text``: model, weights sha256), and training reads these instead of
running the tower. It needs a latent run: pixel shards are not rewritten.

With ``vae=none`` the stage has nothing to do and says so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.cores import available_cores
from ddm.data.shards import MANIFEST, ShardSetWriter, load_manifest, shard_paths
from ddm.data.verified import cache_path, check_recorded
from ddm.devices import autocast_dtype, resolve_device
from ddm.errors import MissingInput
from ddm.images import model_space_on
from ddm.io import read_json, sha256_strings
from ddm.latent.partition_images import ImageBatch, image_batches
from ddm.latent.run_latents import current_identity, same_text, same_vae, stored_text_of, vae_spec
from ddm.latent.vae import LatentCodec
from ddm.launch.encode_job import cluster_locks, job_folder, selected_clusters, writing_cluster
from ddm.lineage import check_partition
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.text.encoder import OpenClipTextEncoder
from ddm.text.spec import captions_for, stored_text_spec

log = logging.getLogger("ddm")


@dataclass(frozen=True)
class Encoder:
    """How partitions become latents: the VAE where it runs, the batches, and what each sample stores."""

    codec: LatentCodec
    autocast: torch.dtype | None  # bf16 on a GPU (vae.precision=auto), None: fp32
    batch_size: int
    workers: int  # processes that decode the stored images (0: this one)
    flip: bool  # also the mirrored image's latent (flip.npy)
    tower: OpenClipTextEncoder | None = None  # text.store=true: the caption encodings are stored too

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device


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
    clusters = selected_clusters(cfg.vae.clusters, int(index["num_clusters"]))
    identity = current_identity(spec)
    encoder, done, encoded = None, [], []
    with cluster_locks(rd, clusters):
        for i in clusters:
            partition = load_manifest(rd.partition(i))
            # a partition folder left from another clustering (or copied from another run) is not encoded as this one
            check_partition(partition, i, index, rd.partition_manifest(i), rd.partitions_index)
            if not cfg.redo and _up_to_date(rd.latent(i), partition, identity, bool(cfg.vae.flip), text):
                done.append(i)
                continue
            encoder = encoder or _encoder(cfg, spec, text)
            # the latents' checksums are computed from what is read here: show the pixels are the partition's first
            check_recorded(rd.partition(i), partition, cache_path(job_folder(rd, i)))
            _encode_partition(rd, i, partition, encoder, captions_for(cfg, partition) if text else None)
            encoded.append(i)
    log.info("encode: clusters %s encoded, %s already done -> %s", encoded, done, rd.latents)
    summary = dict(
        stage="encode", vae=dict(identity, source=spec["pretrained"]), clusters=clusters, encoded=encoded, done=done
    )
    return StageResult(summary, skipped=not encoded)


def _up_to_date(out: Path, partition: dict, identity: dict, flip: bool, text: dict | None) -> bool:
    """True when ``out`` holds latents of this partition, by this VAE, with the same flips and caption encodings."""
    if not (out / MANIFEST).exists():
        return False
    existing = read_json(out / MANIFEST)
    return (
        existing.get("keys_sha256") == partition["keys_sha256"]
        and existing.get("clustering_id") == partition.get("clustering_id")
        and same_vae(existing.get("vae"), identity)
        and bool(existing.get("flip", False)) == flip
        and same_text(stored_text_of(existing), text)
    )


def _encoder(cfg: Settings, spec: dict, text: dict | None) -> Encoder:
    device = resolve_device(cfg.vae.device, "vae.device")
    codec = LatentCodec.load(spec["pretrained"], spec["allow_download"]).to(device)
    tower = None
    if text is not None:
        tower = OpenClipTextEncoder(text["model"], text["pretrained"], device=device, cache=int(text["cache"]))
    return Encoder(
        codec=codec,
        autocast=autocast_dtype(cfg.vae.precision, device, "vae.precision"),
        batch_size=int(cfg.vae.batch_size),
        workers=available_cores() if cfg.vae.workers is None else int(cfg.vae.workers),
        flip=bool(cfg.vae.flip),
        tower=tower,
    )


def _encode_partition(rd: RunDir, k: int, partition: dict, enc: Encoder, captions=None) -> None:
    """Cluster ``k``'s latents, written whole, then put in place; ``captions`` for the stored text encodings."""
    codec = enc.codec
    shape = codec.latent_shape(int(partition["channels"]), int(partition["image_size"]))
    extra = {
        key: partition[key] for key in ("num_classes", "class_names", "clustering_id", "cluster") if key in partition
    }
    keys: list[str] = []
    with (
        writing_cluster(rd, k) as folder,
        ShardSetWriter(
            folder,
            int(partition["shards"][0]["num_samples"]) if partition["shards"] else 1,
            channels=shape[0],
            image_size=shape[1],
            image_channels=int(partition["channels"]),
            pixel_size=int(partition["image_size"]),
            vae=codec.identity(),
            latent_dtype="float16",
            encode_precision="bf16" if enc.autocast == torch.bfloat16 else "fp32",
            flip=enc.flip,  # each sample also holds its mirrored image's latent (flip.npy); training takes either
            **extra,
            **({} if enc.tower is None else dict(text=_text_record(enc.tower))),
        ) as writer,
    ):
        paths = shard_paths(rd.partition(k), partition)
        for batch in image_batches(paths, enc.batch_size, enc.workers):
            _write_batch(writer, batch, enc, captions)
            keys.extend(batch.keys)
        writer.extra["keys_sha256"] = sha256_strings(keys)  # equal to the partition's: same keys, same order
    log.info("encode: cluster %d, %d samples -> %s %s", k, len(keys), "x".join(map(str, shape)), rd.latent(k))


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


def _text_arrays(batch: ImageBatch, tower: OpenClipTextEncoder, captions) -> list[dict]:
    """Each sample's caption encoding: the caption's own tokens (padding cut off) and the pooled vector."""
    encoded = tower([captions(c, y, key) for c, y, key in zip(batch.captions, batch.labels, batch.keys)])
    tokens = encoded.tokens.cpu().numpy().astype(np.float16)
    lengths = encoded.mask.sum(1).tolist()
    pooled = encoded.pooled.cpu().numpy().astype(np.float16)
    return [{"txt_tokens.npy": tokens[i, : int(n)], "txt_pooled.npy": pooled[i]} for i, n in enumerate(lengths)]


def _latents(enc: Encoder, x: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] on the VAE's device -> float16 latents on the host."""
    precision = torch.autocast(x.device.type, dtype=enc.autocast) if enc.autocast else contextlib.nullcontext()
    with torch.no_grad(), precision:
        z = enc.codec.encode(x)
    # float16 where the VAE ran, so only the latents cross to the host: the same rounding as numpy's astype
    return z.float().to(torch.float16).cpu().numpy()


def _write_batch(writer: ShardSetWriter, batch: ImageBatch, enc: Encoder, captions=None) -> None:
    # uint8 to the device, scaled there: a quarter of the bytes of float32 cross, in the layout
    # ddm.images.batch_to_nchw gives (the same values and strides, so the same latents on the CPU)
    x = model_space_on(batch.images, enc.device)
    latents = _latents(enc, x)
    mirrored = _latents(enc, x.flip(-1)) if enc.flip else [None] * len(batch)
    texts = _text_arrays(batch, enc.tower, captions) if enc.tower is not None else [{}] * len(batch)
    for key, label, caption, latent, other, stored in zip(
        batch.keys, batch.labels, batch.captions, latents, mirrored, texts
    ):
        arrays = dict(npy=latent) if other is None else {"npy": latent, "flip.npy": other}
        arrays.update(stored)
        writer.write(key, None, label, caption, arrays=arrays)
