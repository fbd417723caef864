"""Each rank reads its own samples, whatever start method its loader workers use.

A loader worker started by spawn or forkserver (Python 3.14's default) sees no
process group: only a forked one inherits it. So the rank must reach the
pipeline from the rank's main process, not be looked up inside the worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from ddm.data.loader import batch_loader, sample_stream
from ddm.data.shards import ShardSetWriter

SEED = 11
SHARDS, PER_SHARD = 4, 12
BUFFER = 6
BATCH, BATCHES = 4, 6
WORKERS = 2
ROOT = Path(__file__).resolve().parent.parent


def key_caption(caption, label, key):
    """The sample's key as its caption: batches then say which samples they hold (module level: picklable)."""
    return key


def make_shards(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for s in range(SHARDS):
        with ShardSetWriter(folder / f"s{s}", shard_size=PER_SHARD) as w:
            for i in range(PER_SHARD):
                w.write(f"s{s}_{i:02d}", rng.integers(0, 256, (8, 8), dtype=np.uint8), i % 3)
        urls.append(str(folder / f"s{s}" / "shard-000000.tar"))
    return urls


def stream(urls: list[str], **rank):
    return sample_stream(urls, 1, seed=SEED, shuffle_buffer=BUFFER, captions=key_caption, **rank)


def first_keys(dataset, workers: int = 0, start_method: str | None = None) -> list[list[str]]:
    """The keys of the first BATCHES batches, read through the training loader."""
    loader = batch_loader(dataset, BATCH, workers, start_method=start_method)
    batches = []
    for _, _, keys in loader:
        batches.append(list(keys))
        if len(batches) == BATCHES:
            return batches
    raise AssertionError("the loader ended")  # it resamples shards forever


def read_as_rank(rank: int, world: int, store: str, urls: list[str], out: str) -> None:
    """One rank of a real gloo group: its stream built as training builds it (rank from the group), read by
    forkserver workers, which see no process group."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        keys = first_keys(stream(urls), WORKERS, "forkserver")
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(keys))


def test_an_explicit_rank_gives_the_stream_that_rank_reads_in_a_process_group(tmp_path):
    urls = make_shards(tmp_path / "shards")
    rank0, rank1 = first_keys(stream(urls, rank=0)), first_keys(stream(urls, rank=1))
    assert rank0 != rank1, "ranks 0 and 1 read the same samples"
    assert first_keys(stream(urls, rank=1)) == rank1  # the rank, seed and worker fix the order
    # a process group of which this process is rank 1 (fake: no peer needed); the rank is taken from it
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        in_group = first_keys(stream(urls))
    finally:
        dist.destroy_process_group()
    assert in_group == rank1


def test_two_ranks_with_forkserver_workers_read_different_samples(tmp_path):
    urls = make_shards(tmp_path / "shards")
    outs = [tmp_path / f"rank-{r}.json" for r in (0, 1)]
    store = tmp_path / "store"
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, json; from tests.test_loader_ranks import read_as_rank; "
                "read_as_rank(int(sys.argv[1]), 2, sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])",
                str(r),
                str(store),
                json.dumps(urls),
                str(outs[r]),
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    errors = [p.communicate(timeout=600)[1] for p in ranks]
    for p, err in zip(ranks, errors):
        assert p.returncode == 0, err[-3000:]
    rank0, rank1 = (json.loads(o.read_text()) for o in outs)
    assert rank0 != rank1, "both ranks read the same samples: the workers did not know their rank"
    # each batch comes from one worker (batched inside it): worker w of rank 0 and worker w of rank 1 differ too
    assert all(a != b for a, b in zip(rank0, rank1))
    # what a rank reads is what its stream reads outside any group when given that rank
    assert rank1 == first_keys(stream(urls, rank=1), WORKERS, "forkserver")
    assert rank0 == first_keys(stream(urls, rank=0), WORKERS, "forkserver")
