"""Expert and router training: isolation, exact step counts, resume, NaN handling, router accuracy by t."""
from __future__ import annotations

import shutil

import pytest
import torch

from ddm.io import read_json
from ddm.stages import train_expert, train_router
from tests.fabricate import make_partitions

FAST = ["model.size=DiT-N/2", "island.num_workers=0", "expert.batch_size=8", "expert.warmup_steps=2",
        "expert.shuffle_buffer=10", "router.size=DiT-N/2", "router.batch_size=16", "router.shuffle_buffer=50",
        "router.warmup_steps=5", "router.eval_samples=200"]


def files_under(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_expert_trains_alone_and_touches_only_its_own_folder(make_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(30, 20, 25))
    # Every other partition is absent: the expert must not need them.
    shutil.rmtree(rd.partition(0))
    shutil.rmtree(rd.partition(2))
    (rd.partitions / "manifest.json").unlink()
    before = files_under(rd.root)
    cfg = make_cfg(*FAST, "expert.id=1", "expert.steps=5", "expert.ckpt_every=2")
    record = train_expert.run(cfg)

    assert not torch.distributed.is_initialized()  # no process group on a single-device island
    assert record["steps"] == 5 and record["samples_seen"] == 40
    assert record["clustering_id"] == "c0ffee" and record["partition_samples"] == 20
    after = files_under(rd.root)
    new = {p for p in after if p not in before}
    assert new and all(p.parts[:2] == ("experts", "expert-01") for p in new), new
    assert all(after[p] == before[p] for p in before)  # nothing it read was modified
    payload = torch.load(rd.expert_weights(1), weights_only=False)
    assert payload["kind"] == "expert" and payload["expert_id"] == 1 and payload["steps"] == 5


def test_expert_rerun_skips_and_redo_retrains(make_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    cfg = make_cfg(*FAST, "expert.steps=2")
    train_expert.run(cfg)
    mtime = rd.expert_weights(0).stat().st_mtime_ns
    train_expert.run(cfg)
    assert rd.expert_weights(0).stat().st_mtime_ns == mtime
    train_expert.run(make_cfg(*FAST, "expert.steps=3", "redo=true"))
    assert read_json(rd.expert_record(0))["steps"] == 3


def test_interrupted_expert_resumes_to_exact_step_count(make_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = make_cfg(*FAST, "expert.steps=6", "expert.ckpt_every=2")
    original = train_expert.ExpertModule.training_step

    def crash_at_step_5(self, batch, idx):
        if self.global_step == 5:
            raise KeyboardInterrupt  # as a preemption would, without saving
        return original(self, batch, idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", crash_at_step_5)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)
    assert not rd.expert_record(0).exists() and not rd.expert_weights(0).exists()
    assert torch.load(rd.expert(0) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    record = train_expert.run(cfg)
    assert record["steps"] == 6
    assert record["resumed_from"].endswith("last.ckpt")


def test_nan_loss_stops_and_names_the_step(make_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = make_cfg(*FAST, "expert.steps=5")
    original = train_expert.ExpertModule.training_step

    def poisoned(self, batch, idx):
        x, y = batch
        if self.global_step == 2:
            x = x * float("nan")
        return original(self, (x, y), idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", poisoned)
    with pytest.raises(FloatingPointError, match="expert 0.*step 2"):
        train_expert.run(cfg)
    assert not rd.expert_record(0).exists()


def test_missing_partition_is_a_clear_error(make_cfg, tmp_path):
    make_partitions(tmp_path / "run", sizes=(10, 10))
    with pytest.raises(FileNotFoundError, match="expert.id=5"):
        train_expert.run(make_cfg(*FAST, "expert.id=5"))


def test_router_learns_separable_clusters_and_falls_to_prior_at_noise(make_cfg, tmp_path):
    torch.manual_seed(0)
    rd = make_partitions(tmp_path / "run", sizes=(150, 50), shard_size=25)  # prior 0.75 / 0.25
    cfg = make_cfg(*FAST, "router.steps=150", "router.lr=3e-3", "router.t_buckets=10")
    record = train_router.run(cfg)
    by_t = record["accuracy_by_t"]
    assert len(by_t) == 10 and record["num_experts"] == 2
    assert by_t[0]["accuracy"] > 0.95, by_t[0]           # clean images: clusters are obvious
    prior = by_t[-1]["prior_accuracy"]
    assert abs(prior - 0.75) < 0.05
    assert by_t[-1]["accuracy"] < prior + 0.1, by_t[-1]  # pure noise: no better than the prior
    assert by_t[-1]["entropy"] > by_t[0]["entropy"]
    payload = torch.load(rd.router_weights, weights_only=False)
    assert payload["num_experts"] == 2 and payload["clustering_id"] == "c0ffee"


def test_router_rejects_partitions_from_two_clusterings(make_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(10, 10))
    make_partitions(tmp_path / "other", sizes=(10, 10), clustering_id="beef")
    shutil.rmtree(rd.partition(1))
    shutil.copytree((tmp_path / "other" / "partitions" / "cluster-01"), rd.partition(1))
    with pytest.raises(ValueError, match="different clusterings"):
        train_router.run(make_cfg(*FAST))
