"""An expert checks the shards it reads once per island and once per change: not on every rank at every start.

Each start here is a real ``train-expert`` start on real shards on disk, stopped at its first
training step (as a preemption would stop it); sha256 calls are counted where the shards are hashed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ddm.data import shards
from ddm.data.verified import verified_shards
from ddm.errors import BadInput, Unusable
from ddm.stages import encode, train_expert
from tests.fabricate import make_partitions
from tests.test_latent_vae import save_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    save_tiny_vae(folder, in_channels=3, scaling_factor=0.5)
    return folder


def count_hashes(monkeypatch) -> list[Path]:
    """Every file hashed to check it against its manifest, in order."""
    hashed: list[Path] = []
    real = shards.sha256_file

    def spy(path, *args, **kwargs):
        hashed.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shards, "sha256_file", spy)
    return hashed


def start(cfg, monkeypatch) -> None:
    """One start of the expert job, stopped at its first training step: everything before training runs."""

    def stop(self, batch, idx):
        raise KeyboardInterrupt  # as a preemption would, before any step is saved

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", stop)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    path.write_bytes(bytes(data))


def test_a_restarted_expert_hashes_only_the_shards_that_changed(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    cfg = fast_cfg("expert.steps=4")
    hashed = count_hashes(monkeypatch)
    ours = sorted(rd.partition(0).glob("shard-*.tar"))
    assert len(ours) == 4

    start(cfg, monkeypatch)
    assert sorted(hashed) == ours  # the first start reads every shard of its own partition, once

    hashed.clear()
    start(cfg, monkeypatch)  # a requeue: nothing changed, nothing is read again
    assert hashed == []
    assert (rd.expert(0) / "verified.json").exists()  # what was checked is kept in the job's own folder

    touched = ours[1]  # the same bytes with a new mtime (copied again): read again, alone
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    start(cfg, monkeypatch)
    assert hashed == [touched]

    damaged = ours[2]
    flip_a_byte(damaged)
    hashed.clear()
    with pytest.raises(BadInput, match=r"shard-000002\.tar does not match the checksum.*ddm partition redo=true"):
        train_expert.run(cfg)  # refused before training: no KeyboardInterrupt from the first step
    assert hashed == [damaged]


def test_ranks_other_than_zero_read_no_shard(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    cfg = fast_cfg("expert.steps=4", "expert.verify_wait_s=0")
    hashed = count_hashes(monkeypatch)

    # rank 1 of a 2-device DDP island (as Lightning starts it) before rank 0 has checked: it waits, reading nothing
    monkeypatch.setenv("LOCAL_RANK", "1")
    island = fast_cfg("expert.steps=4", "expert.verify_wait_s=0", "island.devices=2", "island.strategy=ddp")
    with pytest.raises(Unusable, match=r"global rank 0 to check the shards of .*cluster-00.*verified\.json"):
        train_expert.run(island)
    assert hashed == []
    # a job of one process checks for itself whatever its launcher's rank says (`srun -n8`, one expert a task)
    train_expert_alone = verified_shards(rd.partition(1), rd.expert(1), env={"SLURM_PROCID": "5"}, processes=1)
    assert train_expert_alone["cluster"] == 1 and len(hashed) == 4
    hashed.clear()

    monkeypatch.delenv("LOCAL_RANK")
    start(cfg, monkeypatch)  # global rank 0 checks and records
    assert len(hashed) == 4

    # rank 3 of an srun job: rank 0's record vouches for every shard as it is now; it reads none
    hashed.clear()
    manifest = verified_shards(rd.partition(0), rd.expert(0), env={"SLURM_PROCID": "3"}, wait_s=0)
    assert manifest["cluster"] == 0 and hashed == []

    # a shard changed since: rank 3 does not take the old record for it, and waits for rank 0 again
    flip_a_byte(rd.partition(0) / "shard-000003.tar")
    with pytest.raises(Unusable, match="global rank 0"):
        verified_shards(rd.partition(0), rd.expert(0), env={"SLURM_PROCID": "3"}, wait_s=0)
    # rank 0 refuses it; the other ranks stop at once with its message instead of waiting for their timeout
    with pytest.raises(BadInput, match=r"shard-000003\.tar does not match"):
        train_expert.run(cfg)
    with pytest.raises(BadInput, match=r"shard-000003\.tar does not match"):
        verified_shards(rd.partition(0), rd.expert(0), env={"SLURM_PROCID": "3"}, wait_s=0)
    assert [p.name for p in hashed] == ["shard-000003.tar"]  # by rank 0 alone


def test_a_latent_expert_hashes_its_latents_and_no_pixel_shard(fast_cfg, tmp_path, monkeypatch, vae_dir):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    cfg = fast_cfg("vae=sd", f"vae.pretrained={vae_dir}", "expert.steps=4")
    encode.run(cfg)
    hashed = count_hashes(monkeypatch)

    start(cfg, monkeypatch)
    latents = sorted(rd.latent(0).glob("shard-*.tar"))
    assert latents and sorted(hashed) == latents  # what the job reads; the pixel shards it never opens are not read
    hashed.clear()
    start(cfg, monkeypatch)
    assert hashed == []
