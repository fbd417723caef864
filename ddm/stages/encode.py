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
from ddm.cluster.lineage import check_partition
from ddm.data.shards import MANIFEST, ShardSetWriter, iter_samples, load_manifest, shard_paths, verify
from ddm.data.verified import check_recorded
from ddm.devices import resolve_device
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.images import batch_to_model_space
from ddm.io import read_json, sha256_strings
from ddm.latent.vae import LatentCodec, resolve_folder, vae_identity
from ddm.stages.conditioning import captions_for, group_kind, stored_text_spec
from ddm.stages.runner import note_skipped
from ddm.text.encoder import OpenClipTextEncoder

log = logging.getLogger("ddm")

KINDS = ("none", "autoencoder_kl")


def vae_spec(cfg) -> dict | None:
    """The run's VAE (``vae`` config group), or None for a pixel run."""
    kind, section = group_kind(cfg, "vae", KINDS)
    if kind == "none":
        return None
    if not section.get("pretrained"):
        raise BadInput("vae=sd needs vae.pretrained: a local AutoencoderKL folder (or a hub id in the local cache)")
    return dict(kind=kind, pretrained=str(section.pretrained), allow_download=bool(section.get("allow_download")))


def current_identity(spec: dict) -> dict:
    """The configured VAE's identity, from its files alone (no model is built)."""
    return vae_identity(resolve_folder(spec["pretrained"], spec["allow_download"]))


def same_vae(recorded: dict | None, identity: dict) -> bool:
    keys = ("weights_sha256", "scaling_factor", "shift_factor")
    return recorded is not None and all(recorded.get(k) == identity[k] for k in keys)


def check_latents_source(manifest: dict, partition: dict, where) -> None:
    """Refuse latents that were encoded from other samples than the partition's."""
    if (manifest.get("keys_sha256"), manifest.get("clustering_id")) != (
        partition.get("keys_sha256"),
        partition.get("clustering_id"),
    ):
        raise BadInput(
            f"{where} was encoded from other partitions (clustering {manifest.get('clustering_id')}, keys "
            f"{str(manifest.get('keys_sha256'))[:12]}..., but the partition is clustering "
            f"{partition.get('clustering_id')}, keys {str(partition.get('keys_sha256'))[:12]}...; a reclustering "
            f"since, or copied from another run?): run `ddm encode redo=true`"
        )


def check_vae(recorded: dict | None, identity: dict, where) -> None:
    """Refuse to decode (or reuse) latents with another VAE than the one they were made with."""
    if not same_vae(recorded, identity):
        recorded = recorded or {}
        raise BadInput(
            f"{where} holds latents of another VAE ({recorded.get('source')}, weights "
            f"{str(recorded.get('weights_sha256'))[:12]}...) than vae.pretrained gives "
            f"({identity['weights_sha256'][:12]}...): set vae.pretrained to the VAE they were made with, "
            f"or encode again (`ddm encode redo=true`) and retrain"
        )


def latent_meta(manifest: dict) -> dict | None:
    """What expert.pt and router.pt record of a latent shard set: the VAE and the pixel shape (None for pixels)."""
    if "vae" not in manifest:
        return None
    return dict(vae=manifest["vae"], image_channels=manifest["image_channels"], pixel_size=manifest["pixel_size"])


def latent_manifest(rd: RunDir, k: int, partition: dict, verify_shards: bool, vae: dict | None = None) -> dict:
    """Cluster ``k``'s latent shard set, checked against its partition (what a latent expert trains on).

    ``vae``: the run's ``vae_spec``, to refuse latents of another VAE before anything trains on them
    (skipped, with a warning, where the VAE's files are not on this machine: the sampler checks it).
    """
    folder = rd.latent(k)
    if not (folder / MANIFEST).exists():
        raise MissingInput(f"no latents at {folder}: run `ddm encode` (vae=... is set, so experts train on latents)")
    manifest = verify(folder) if verify_shards else load_manifest(folder)
    check_latents_source(manifest, partition, folder)
    if vae is not None:
        try:
            identity = current_identity(vae)
        except Unusable as e:
            log.warning("cannot check which VAE %s was encoded with here: %s", folder, e)
        else:
            check_vae(manifest.get("vae"), identity, folder)
    return manifest


def stored_text_of(manifest: dict) -> dict | None:
    """The text tower whose encodings a latent shard set holds (None: captions only)."""
    return manifest.get("text")


def stored_text_length(cfg, manifest: dict, where) -> int:
    """With ``text.store=true``: the context length the loader pads stored encodings to, once the shard set's
    tower is checked against the run's; 0 when the job encodes captions itself."""
    wanted = stored_text_spec(cfg)
    if wanted is None:
        return 0
    recorded = stored_text_of(manifest)
    if recorded is None:
        raise MissingInput(f"{where} holds no caption encodings (text.store=true): run `ddm encode redo=true`")
    if not _same_text(recorded, wanted):
        raise BadInput(
            f"{where} holds caption encodings of another text tower ({recorded.get('model')}, weights "
            f"{str(recorded.get('weights_sha256'))[:12]}...) than text.model/text.pretrained give: encode again "
            f"(`ddm encode redo=true`)"
        )
    return int(recorded["context_length"])


def _same_text(recorded: dict | None, wanted: dict | None) -> bool:
    keys = ("model", "weights_sha256", "init_seed")
    if recorded is None or wanted is None:
        return recorded is wanted
    return all(recorded.get(k) == wanted.get(k) for k in keys)


def run(cfg) -> dict:
    rd = RunDir(cfg.run_dir)
    spec = vae_spec(cfg)
    text = stored_text_spec(cfg)
    if spec is None:
        note_skipped()
        log.info("encode: vae=none, nothing to encode: experts train on pixels")
        return dict(stage="encode", vae=None, clusters=[])
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
        if (out / MANIFEST).exists() and not cfg.get("redo", False):
            existing = read_json(out / MANIFEST)
            flip = bool(cfg.vae.get("flip", False))
            if (
                existing.get("keys_sha256") == partition["keys_sha256"]
                and existing.get("clustering_id") == partition.get("clustering_id")
                and same_vae(existing.get("vae"), identity)
                and bool(existing.get("flip", False)) == flip
                and _same_text(stored_text_of(existing), text)
            ):
                done.append(i)
                continue
        if codec is None:
            device = resolve_device(cfg.vae.get("device"), "vae.device")
            codec = LatentCodec.load(spec["pretrained"], spec["allow_download"]).to(device)
            if text is not None:
                tower = OpenClipTextEncoder(text["model"], text["pretrained"], device=device, cache=int(text["cache"]))
        # the latents' checksums are computed from what is read here: show the pixels are the partition's first
        check_recorded(rd.partition(i), partition, rd.latents / "verified.json")
        writer_text = None if text is None else (tower, captions_for(cfg, partition))
        _encode_partition(
            rd, i, partition, codec, int(cfg.vae.batch_size), bool(cfg.vae.get("flip", False)), writer_text
        )
        encoded.append(i)
    if not encoded:
        note_skipped()
    log.info("encode: clusters %s encoded, %s already done -> %s", encoded, done, rd.latents)
    return dict(stage="encode", vae=dict(identity, source=spec["pretrained"]), encoded=encoded, done=done)


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


class RunLatents:
    """A latent run's VAE in both directions, in batches: images in [-1, 1] <-> the experts' latents."""

    def __init__(self, codec: LatentCodec, image_channels: int, batch_size: int):
        self.codec, self.image_channels, self.batch_size = codec, int(image_channels), int(batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] -> latents (the posterior means), on the CPU."""
        b = self.batch_size
        return torch.cat([self.codec.encode(x[i : i + b].to(self.device)).float().cpu() for i in range(0, len(x), b)])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] with the data's channels, where ``z`` is."""
        b = self.batch_size
        return torch.cat(
            [
                self.codec.decode(z[i : i + b].float().to(self.device), self.image_channels).to(z.device)
                for i in range(0, len(z), b)
            ]
        )


def run_latents(cfg, latents: dict | None, device) -> RunLatents | None:
    """The VAE of a latent run's networks (``latents``: what expert.pt recorded), or None for a pixel run.

    The VAE is ``vae.pretrained`` when the config names one, else the source the
    latents recorded; either way it must be the VAE the latents were made with.
    """
    if latents is None:
        return None
    spec = vae_spec(cfg)
    source = spec["pretrained"] if spec else latents["vae"].get("source")
    allow = bool(spec and spec["allow_download"])
    check_vae(latents["vae"], vae_identity(resolve_folder(source, allow)), f"the experts' expert.pt (vae {source})")
    codec = LatentCodec.load(source, allow).to(device)
    return RunLatents(codec, int(latents["image_channels"]), int((cfg.get("vae") or {}).get("batch_size") or 64))


def latent_decoder(cfg, latents: dict | None, device):
    """``decode(z) -> images in [-1, 1]`` for a latent run's samples, or None for a pixel run."""
    space = run_latents(cfg, latents, device)
    return None if space is None else space.decode
