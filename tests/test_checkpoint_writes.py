"""Each checkpoint is written once: ``last.ckpt`` is a hard link to the step checkpoint of the same step.

For a DiT-XL/2 a checkpoint is about 10.8 GB; writing ``step-*.ckpt`` and then
``last.ckpt`` in full doubled that at every save, with the other ranks waiting.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from ddm.stages import train_expert
from ddm.train import job_checkpoint
from ddm.train.checkpoint_io import AtomicCheckpointIO
from ddm.train.signals import Preempted
from tests.fabricate import make_partitions


@pytest.fixture
def full_writes(monkeypatch):
    """The file names every full checkpoint write went to, in order."""
    names: list[str] = []
    original = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, storage_options=None):
        names.append(os.path.basename(str(path)))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
    return names


def _step(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_last_is_a_link_to_the_step_checkpoint_and_each_step_is_written_once(fast_cfg, tmp_path, full_writes):
    rd = make_partitions(tmp_path / "run")
    record = train_expert.run(fast_cfg("expert.steps=6", "expert.ckpt_every=2", "expert.keep_checkpoints=1"))
    assert record["steps"] == 6
    # three checkpoints, three writes; before, each was followed by a full write of last.ckpt
    assert full_writes == ["step-0000002.ckpt", "step-0000004.ckpt", "step-0000006.ckpt"]
    folder = rd.expert(0) / "checkpoints"
    last, newest = folder / "last.ckpt", folder / "step-0000006.ckpt"
    assert not last.is_symlink() and os.path.samefile(last, newest)  # a hard link: one file on disk
    # keep_checkpoints=1 pruned the older step files; last.ckpt still holds the newest whole checkpoint
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step-0000006.ckpt"]
    assert _step(last) == 6


def test_without_hard_links_last_is_written_in_full(fast_cfg, tmp_path, full_writes, monkeypatch):
    rd = make_partitions(tmp_path / "run")

    def no_links(src, dst, *args, **kwargs):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(job_checkpoint.os, "link", no_links)
    train_expert.run(fast_cfg("expert.steps=4", "expert.ckpt_every=2"))
    assert full_writes == ["step-0000002.ckpt", "last.ckpt", "step-0000004.ckpt", "last.ckpt"]
    folder = rd.expert(0) / "checkpoints"
    assert os.stat(folder / "last.ckpt").st_nlink == 1 and _step(folder / "last.ckpt") == 4
    assert not list(folder.glob(".*.tmp"))  # no temp link left behind


def test_a_signal_between_checkpoints_writes_last_in_full_and_the_job_resumes(
    fast_cfg, tmp_path, full_writes, monkeypatch
):
    rd = make_partitions(tmp_path / "run")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = fast_cfg("expert.steps=6", "expert.ckpt_every=2")
    original = train_expert.ExpertModule.training_step

    def signalled(self, batch, idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", signalled)
    with pytest.raises(Preempted):
        train_expert.run(cfg)
    folder = rd.expert(0) / "checkpoints"
    # step 3 has no step checkpoint to link to: last.ckpt is its own, complete file
    assert full_writes == ["step-0000002.ckpt", "last.ckpt"]
    assert _step(folder / "last.ckpt") == 3 and not os.path.samefile(folder / "last.ckpt", folder / "step-0000002.ckpt")

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    record = train_expert.run(cfg)
    assert record["steps"] == 6 and record["resumed_from_step"] == 3
    # the full last.ckpt of step 3 was replaced by a link (a rename onto it), not written through
    assert os.path.samefile(folder / "last.ckpt", folder / "step-0000006.ckpt")
