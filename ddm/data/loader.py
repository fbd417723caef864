"""Streaming training batches from webdataset shard sets.

Shards are *resampled* (drawn with replacement, per rank and per worker, from a
seed): the stream is infinite, every worker always has data however few shards
a small cluster has (webdataset's split-by-worker hangs when shards < ranks x
workers), and training is measured in steps, not epochs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import torch
import webdataset as wds

from ddm.data.shard_format import STORED_IMAGE_EXTS
from ddm.errors import BadInput
from ddm.images import to_chw_uint8
from ddm.models.conditioning import TextCondition, batch_text_length
from ddm.seeds import partition_stream_seed, stream_seed


def _decoder(channels: int) -> str:
    return "l8" if channels == 1 else "rgb8"


def sample_stream(
    urls: list[str],
    channels: int,
    seed: int,
    shuffle_buffer: int = 1000,
    tag: int | None = None,
    captions: Callable[[str | None, int, str], str] | None = None,
    stored_text: int = 0,
    rank: int | None = None,
):
    """An infinite pipeline of ``(image, label)`` (or ``(image, label, tag)``) from resampled shards.

    With ``captions`` (a ``ddm.text.captions.Captions``) each sample also
    carries its caption string, last: ``(image, label[, tag], caption)``.
    With ``stored_text`` (the text tower's context length) it carries the
    caption's encoding that ``ddm encode`` stored instead (a ``StoredText``),
    and batches hold a ``TextCondition`` padded to that length.

    Images stay uint8 CxHxW: the training step scales them on its device
    (``ddm.images.batch_to_model_space_on_device``), so workers, shared memory
    and the host-to-device copy move a quarter of the bytes of float32.

    ``rank``: the global rank reading this stream; None: this process's (``process_rank``), looked up
    here, in the rank's own process. The shards drawn, the shuffle and the flips follow (seed, rank,
    loader worker), and a loader worker is never asked for the rank: one started by spawn or
    forkserver (Python 3.14's default) sees no process group, so every rank would read rank 0's stream.
    The stages are module-level classes for the same reason: such a worker receives them pickled.
    """
    if not urls:
        raise BadInput("sample_stream needs at least one shard")
    rank = process_rank() if rank is None else int(rank)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=_ShardSeed(rank), deterministic=True),
        wds.tarfile_to_samples(),
        seeded_shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed, rank=rank),
        seeded_flip(seed, rank=rank),
        wds.decode(_decoder(channels)),
        wds.map(_ToTuple(tag, captions, stored_text)),
    )


def process_rank() -> int:
    """This process's global rank as webdataset reads it: ``RANK`` (with ``WORLD_SIZE``, as torchrun sets them),
    else the initialised process group's, else 0.

    Ask it in a rank's main process, never in a loader worker (see ``sample_stream``). Where the stream is
    built before the process group exists (``ddm.train.job`` builds it before ``fit``), pass the trainer's
    ``global_rank`` instead.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def loader_worker() -> int:
    """The loader worker this runs in (0 outside one): known inside a worker under any start method."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class _ShardSeed:
    """``ResampledShards``' worker seed: webdataset's own formula (``rank * 1000 + worker``, so the shards
    drawn are those drawn before), with the rank given rather than looked up in the worker."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + loader_worker()


def _image(sample: dict):
    for ext in STORED_IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadInput(f"sample {sample.get('__key__')!r} of {sample.get('__url__')} holds no image and no latent")


class _ToTuple:
    """A decoded sample as ``(image, label[, tag][, caption or StoredText])``."""

    def __init__(self, tag: int | None, captions, stored_text: int):
        self.tag, self.captions, self.stored_text = tag, captions, stored_text

    def __call__(self, sample):
        # a latent shard set holds float16 latents under npy; a pixel one uint8 images under png or jpg
        x = torch.from_numpy(np.asarray(sample["npy"])) if "npy" in sample else to_chw_uint8(_image(sample))
        y = int(sample["cls"])
        out = (x, y) if self.tag is None else (x, y, self.tag)
        if self.stored_text:
            return (*out, StoredText.of(sample, self.stored_text))
        if self.captions is None:
            return out
        return (*out, self.captions(sample.get("txt"), y, sample.get("__key__", "")))


FLIP_STREAM = 7  # mixed into the flip draws' seed: they are not the shuffle's draws


def seeded_flip(seed: int, rank: int | None = None):
    """Where a latent sample also holds its mirrored image's latent (``flip.npy``), take either, at random.

    The draws follow ``seed``, the rank (None: ``process_rank()``, asked now) and the loader worker, like
    the shuffle; samples without ``flip.npy`` (pixel shard sets) pass unchanged.
    """
    return _SeededFlip(seed, process_rank() if rank is None else int(rank))


class _SeededFlip:
    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, source):
        rng = random.Random(stream_seed(self.seed, self.rank, loader_worker(), FLIP_STREAM))
        for sample in source:
            if "flip.npy" in sample:
                sample = dict(sample)
                mirrored = sample.pop("flip.npy")
                if rng.random() < 0.5:
                    sample["npy"] = mirrored
            yield sample


def seeded_shuffle(bufsize: int, initial: int, seed: int, rank: int | None = None):
    """A shuffle buffer whose order follows ``seed``, the rank (None: ``process_rank()``, asked now) and the
    loader worker.

    webdataset's own shuffle seeds itself from the pid and the clock, so two runs
    with one seed trained on different orders. The generator is made where the
    stage first runs, inside the worker, so each (rank, worker) gets its own.
    """
    return _SeededShuffle(bufsize, initial, seed, process_rank() if rank is None else int(rank))


class _SeededShuffle:
    def __init__(self, bufsize: int, initial: int, seed: int, rank: int):
        self.bufsize, self.initial, self.seed, self.rank = bufsize, initial, seed, rank

    def __call__(self, source):
        rng = random.Random(stream_seed(self.seed, self.rank, loader_worker()))
        return wds.shuffle(self.bufsize, initial=self.initial, rng=rng)(source)


class StoredText:
    """One sample's stored caption encoding: its caption's tokens only (``[n, D]`` float16) and pooled ``[D]``."""

    TOKENS, POOLED = "txt_tokens.npy", "txt_pooled.npy"

    def __init__(self, tokens: np.ndarray, pooled: np.ndarray, length: int, key: str = ""):
        if tokens.ndim != 2 or pooled.shape != (tokens.shape[1],) or not 0 < len(tokens) <= length:
            raise BadInput(
                f"sample {key or '?'}: stored text of shape {tokens.shape} / {pooled.shape} is not [n <= {length}, D] "
                f"/ [D]: the shards were not written by `ddm encode`; encode again with `ddm encode redo=true`"
            )
        self.tokens, self.pooled, self.length = tokens, pooled, int(length)

    @classmethod
    def of(cls, sample: dict, length: int) -> StoredText:
        key = sample.get("__key__", "")
        if cls.TOKENS not in sample or cls.POOLED not in sample:
            raise BadInput(f"sample {key or '?'} has no stored text: encode with text.store=true (`ddm encode`)")
        return cls(np.asarray(sample[cls.TOKENS]), np.asarray(sample[cls.POOLED]), length, key)

    @staticmethod
    def batch(items: list[StoredText]) -> TextCondition:
        """A ``TextCondition`` (float16 on the host; the step moves it and makes it float) padded with zeros
        to the longest caption's length (``batch_text_length``)."""
        dim = items[0].tokens.shape[1]
        length = batch_text_length(max(len(item.tokens) for item in items), items[0].length)
        tokens = torch.zeros(len(items), length, dim, dtype=torch.float16)
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, item in enumerate(items):
            n = len(item.tokens)
            tokens[i, :n] = torch.from_numpy(item.tokens.astype(np.float16))
            mask[i, :n] = True
        pooled = torch.from_numpy(np.stack([item.pooled for item in items]).astype(np.float16))
        return TextCondition.of(tokens, mask, pooled)


def _collate(samples):
    """Images stacked; integer columns (label, tag) as long tensors; captions as a list of strings
    (stored caption encodings as one ``TextCondition``)."""
    cols = list(zip(*samples))
    out = [torch.stack(cols[0])]
    for col in cols[1:]:
        if isinstance(col[0], StoredText):
            out.append(StoredText.batch(list(col)))
        else:
            out.append(list(col) if isinstance(col[0], str) else torch.tensor(col, dtype=torch.long))
    return tuple(out)


def batch_loader(dataset, batch_size: int, num_workers: int, start_method: str | None = None) -> wds.WebLoader:
    """Batch inside the workers (cheap IPC); the loader just forwards batches.

    ``start_method``: how the workers start ("fork", "spawn", "forkserver"); None: Python's default.
    """
    pipeline = wds.DataPipeline(dataset, wds.batched(batch_size, collation_fn=_collate, partial=False))
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # DataLoader refuses a start method without workers
        multiprocessing_context=start_method if num_workers else None,
    )


def mixed_stream(
    parts: list[tuple[list[str], float]],
    channels: int,
    seed: int,
    shuffle_buffer: int = 1000,
    captions=None,
    stored_text: int = 0,
    rank: int | None = None,
):
    """Samples from several shard sets, drawn with the given weights and tagged with their index.

    The router trains on this: weighting by cluster size keeps the class prior
    p(k) equal to the data's, which a uniform draw over shards would not.
    ``rank``: as in ``sample_stream``.
    """
    rank = process_rank() if rank is None else int(rank)
    streams = [
        sample_stream(
            urls,
            channels,
            partition_stream_seed(seed, i),
            shuffle_buffer,
            tag=i,
            captions=captions,
            stored_text=stored_text,
            rank=rank,
        )
        for i, (urls, _) in enumerate(parts)
    ]
    return wds.RandomMix(streams, probs=[w for _, w in parts])
