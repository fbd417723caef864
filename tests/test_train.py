"""Expert and router training: isolation, exact step counts, resume, NaN handling, router accuracy by t."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm.data.router_data import split_shards
from ddm.data.shards import load_manifest, shard_paths
from ddm.io import read_json, sha256_file
from ddm.seeds import router_shards_seed
from ddm.stages import train_expert, train_router
from tests.fabricate import make_partitions


def files_under(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_expert_trains_alone_and_touches_only_its_own_folder(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(30, 20, 25))
    # Every other partition is absent: the expert must not need them.
    shutil.rmtree(rd.partition(0))
    shutil.rmtree(rd.partition(2))
    (rd.partitions / "manifest.json").unlink()
    before = files_under(rd.root)
    cfg = fast_cfg("expert.id=1", "expert.steps=5", "expert.ckpt_every=2")
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
    assert payload["label_dropout"] == 0.1  # the sampler refuses guidance when it is 0
    # the weights' checksum goes into the record: a sampler can tell a damaged copy
    assert read_json(rd.expert_record(1))["weights_sha256"] == sha256_file(rd.expert_weights(1))


def _target_loss(net, rd, k: int, target: str) -> float:
    """Mean loss of ``net`` on partition ``k`` against ``target``, at fixed t and noise."""
    from ddm.data.shards import iter_samples
    from ddm.flow import FlowPath
    from ddm.images import batch_to_model_space

    samples = list(iter_samples(shard_paths(rd.partition(k))))
    x0 = batch_to_model_space(np.stack([s["image"] for s in samples]))
    y = torch.tensor([s["label"] for s in samples])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return float(FlowPath().loss(net, x0, y, generator=g, prediction=target).mean())


def test_an_expert_trained_on_eps_learns_it_and_says_so(fast_cfg, tmp_path):
    from ddm.models.dit import DiT
    from ddm.models.prediction import PredictionToVelocity
    from ddm.sampling import load_expert

    rd = make_partitions(tmp_path / "run", sizes=(24, 24))
    record = train_expert.run(fast_cfg("expert.target=eps", "expert.steps=30", "expert.lr=3e-3"))
    assert record["target"] == "eps" and record["model_size"] == "DiT-N/2"
    payload = torch.load(rd.expert_weights(0), weights_only=True)
    assert payload["target"] == "eps"
    net, meta = load_expert(rd.expert_weights(0), velocity=False)
    assert isinstance(net, DiT) and meta["target"] == "eps"
    untrained = DiT(**payload["model_config"])  # adaLN-Zero: predicts 0, so its eps loss is E[eps^2] = 1
    before, after = _target_loss(untrained, rd, 0, "eps"), _target_loss(net, rd, 0, "eps")
    assert before == pytest.approx(1.0, abs=0.05) and after < 0.8 * before, (before, after)
    velocity, _ = load_expert(rd.expert_weights(0))
    assert (
        isinstance(velocity, PredictionToVelocity)
        and velocity.target == "eps"
        and velocity.net.config() == net.config()
    )


def test_the_target_is_part_of_a_jobs_identity(fast_cfg, tmp_path, monkeypatch):
    """A checkpoint of a velocity expert is not resumed as an eps expert."""
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=4", "expert.ckpt_every=2")
    original = train_expert.ExpertModule.training_step

    def crash_at_step_3(self, batch, idx):
        if self.global_step == 3:
            raise KeyboardInterrupt
        return original(self, batch, idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", crash_at_step_3)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)
    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    with pytest.raises(ValueError, match=r"target: checkpoint 'velocity' vs now 'x0'.*redo=true"):
        train_expert.run(fast_cfg("expert.steps=4", "expert.ckpt_every=2", "expert.target=x0"))
    with pytest.raises(ValueError, match=r"expert.target='v' is not one of"):
        train_expert.run(fast_cfg("expert.steps=4", "expert.target=v", "redo=true"))
    assert not rd.expert_record(0).exists()


def test_a_finished_expert_of_another_kind_is_kept_and_named(fast_cfg, tmp_path, caplog):
    make_partitions(tmp_path / "run")
    first = train_expert.run(fast_cfg("expert.steps=2"))
    with caplog.at_level("WARNING", logger="ddm"):
        again = train_expert.run(fast_cfg("expert.steps=2", "expert.target=x0"))
    assert again == first and again["target"] == "velocity"
    assert "a DiT-N/2 predicting velocity, the config asks for a DiT-N/2 predicting x0" in caplog.text


def test_a_damaged_partition_shard_stops_the_expert_naming_it(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    shard = rd.partition(0) / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a sample
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000001.tar does not match the checksum in its manifest"):
        train_expert.run(fast_cfg("expert.steps=2"))
    assert not rd.expert_record(0).exists()


def test_expert_rerun_skips_and_redo_retrains(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=2")
    train_expert.run(cfg)
    mtime = rd.expert_weights(0).stat().st_mtime_ns
    train_expert.run(cfg)
    assert rd.expert_weights(0).stat().st_mtime_ns == mtime
    train_expert.run(fast_cfg("expert.steps=3", "redo=true"))
    assert read_json(rd.expert_record(0))["steps"] == 3


def test_interrupted_expert_resumes_to_exact_step_count(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=6", "expert.ckpt_every=2")
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


def test_a_resumed_expert_reads_on_instead_of_replaying_its_first_batches(fast_cfg, tmp_path, monkeypatch):
    make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=4", "expert.ckpt_every=2")
    original = train_expert.ExpertModule.training_step
    seen, attempt = [], [1]  # (attempt, step, digest of the batch)

    def recording(self, batch, idx):
        if attempt[0] == 1 and self.global_step == 2:
            raise KeyboardInterrupt  # after the checkpoint of step 2
        seen.append((attempt[0], self.global_step, float(batch[0].double().sum())))
        return original(self, batch, idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", recording)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)
    attempt[0] = 2
    assert train_expert.run(cfg)["steps"] == 4
    first = [d for a, _, d in seen if a == 1]
    second = [(step, d) for a, step, d in seen if a == 2]
    assert len(first) == 2 and [step for step, _ in second] == [2, 3]
    assert [d for _, d in second] != first, "the resumed job read its first batches again"


def test_one_seed_trains_the_same_expert_twice(fast_cfg, tmp_path):
    """Every stream is seeded (init, noise, shards, shuffle buffers): two runs give bit-identical weights."""
    weights = []
    for name in ("a", "b"):
        rd = make_partitions(tmp_path / name)
        train_expert.run(fast_cfg("expert.steps=3", run_dir=rd.root))
        weights.append(torch.load(rd.expert_weights(0), weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _poison_at(monkeypatch, step):
    """Make the expert's batch NaN at ``step``, so its loss is not finite there."""
    original = train_expert.ExpertModule.training_step

    def poisoned(self, batch, idx):
        x, y = batch
        return original(self, (x * float("nan") if self.global_step == step else x, y), idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", poisoned)
    return original


def test_nan_loss_stops_and_names_the_step(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=5")
    _poison_at(monkeypatch, 2)
    with pytest.raises(FloatingPointError, match="expert 0.*step 2"):
        train_expert.run(cfg)
    assert not rd.expert_record(0).exists()


def test_missing_partition_is_a_clear_error(fast_cfg, tmp_path):
    make_partitions(tmp_path / "run", sizes=(10, 10))
    with pytest.raises(FileNotFoundError, match="expert.id=5"):
        train_expert.run(fast_cfg("expert.id=5"))


def test_router_learns_separable_clusters_and_falls_to_prior_at_noise(fast_cfg, tmp_path):
    torch.manual_seed(0)
    rd = make_partitions(tmp_path / "run", sizes=(150, 50), shard_size=25)  # prior 0.75 / 0.25
    cfg = fast_cfg("router.steps=150", "router.lr=3e-3", "router.t_buckets=10")
    record = train_router.run(cfg)
    by_t = record["accuracy_by_t"]
    assert len(by_t) == 10 and record["num_experts"] == 2
    assert by_t[0]["accuracy"] > 0.95, by_t[0]  # clean images: clusters are obvious
    prior = by_t[-1]["prior_accuracy"]
    assert abs(prior - 0.75) < 0.05
    assert by_t[-1]["accuracy"] < prior + 0.1, by_t[-1]  # pure noise: no better than the prior
    assert by_t[-1]["entropy"] > by_t[0]["entropy"]
    payload = torch.load(rd.router_weights, weights_only=False)
    assert payload["num_experts"] == 2 and payload["clustering_id"] == "c0ffee"


def test_router_rejects_partitions_from_two_clusterings(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(10, 10))
    make_partitions(tmp_path / "other", sizes=(10, 10), clustering_id="beef")
    shutil.rmtree(rd.partition(1))
    shutil.copytree((tmp_path / "other" / "partitions" / "cluster-01"), rd.partition(1))
    with pytest.raises(ValueError, match=r"come from clusterings \['c0ffee', 'beef'\], but its manifest.json expects"):
        train_router.run(fast_cfg())


# ---- faults: broken checkpoints, failure records, clusterings, records across resumes ----------
def _crash_at(monkeypatch, module_cls, step, exc=KeyboardInterrupt):
    """Make training stop with ``exc`` when it reaches ``step`` (as a preemption would, without saving)."""
    original = module_cls.training_step

    def crashing(self, batch, idx):
        if self.global_step == step:
            raise exc("injected fault")
        return original(self, batch, idx)

    monkeypatch.setattr(module_cls, "training_step", crashing)
    return original


def test_truncated_last_checkpoint_resumes_from_the_newest_complete_one(fast_cfg, tmp_path, monkeypatch, caplog):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=7", "expert.ckpt_every=2", "expert.keep_checkpoints=3", "expert.log_every=1")
    original = _crash_at(monkeypatch, train_expert.ExpertModule, 5)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)
    folder = rd.expert(0) / "checkpoints"
    last = folder / "last.ckpt"
    data = last.read_bytes()
    # a torn write, as a non-atomic save killed midway leaves (or a bad copy): a file of its own, so unlink
    # first, since last.ckpt is a hard link to step-0000004.ckpt and writing through it would tear that too
    last.unlink()
    last.write_bytes(data[: len(data) // 2])
    (folder / "step-0000002.ckpt").write_bytes(b"")  # and an empty one
    (folder / ".last.ckpt.999.tmp").write_bytes(data[:100])  # and a dead writer's temp file

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    with caplog.at_level("WARNING", logger="ddm"):
        record = train_expert.run(cfg)
    assert record["steps"] == 7 and record["resumed_from"].endswith("step-0000004.ckpt")
    assert record["resumed_from_step"] == 4 and record["attempts"] == 2
    assert record["wall_s"] >= record["wall_s_this_attempt"]
    assert "last.ckpt" in caplog.text and "step-0000002.ckpt" in caplog.text and "skipping" in caplog.text
    assert not (folder / ".last.ckpt.999.tmp").exists()
    assert torch.load(last, weights_only=False)["global_step"] == 6  # rewritten whole at the next save
    # each attempt keeps its own metrics file: the resumed one did not erase the first
    logs = sorted((rd.expert(0) / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 2 and all(len(p.read_text().splitlines()) > 1 for p in logs)


def test_failed_training_writes_failed_json_and_success_clears_it(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=4")
    original = _poison_at(monkeypatch, 2)
    with pytest.raises(FloatingPointError):
        train_expert.run(cfg)
    failed = read_json(rd.expert(0) / "failed.json")
    assert failed["error_type"] == "Diverged" and failed["step"] == 2  # a FloatingPointError the user can act on
    assert "step 2" in failed["message"] and failed["job"] == "expert-00" and failed["time"]

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    assert train_expert.run(cfg)["steps"] == 4
    assert not (rd.expert(0) / "failed.json").exists()


def test_an_interrupt_is_not_a_failure(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    _crash_at(monkeypatch, train_expert.ExpertModule, 1)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(fast_cfg("expert.steps=3"))
    assert not (rd.expert(0) / "failed.json").exists()


def test_router_failure_writes_failed_json(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    _crash_at(monkeypatch, train_router.RouterModule, 1, exc=RuntimeError)
    with pytest.raises(RuntimeError, match="injected"):
        train_router.run(fast_cfg("router.steps=3"))
    failed = read_json(rd.router / "failed.json")
    assert failed["job"] == "router" and failed["error_type"] == "RuntimeError" and failed["step"] == 1


def test_router_record_has_flops_and_resumes(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    cfg = fast_cfg("router.steps=5", "router.ckpt_every=2", "router.eval_samples=20")
    original = _crash_at(monkeypatch, train_router.RouterModule, 3)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_router.run(cfg)
    monkeypatch.setattr(train_router.RouterModule, "training_step", original)
    record = train_router.run(cfg)
    assert record["steps"] == 5 and record["resumed_from_step"] == 2 and record["attempts"] == 2
    assert record["forward_flops_per_sample"] > 0
    assert record["train_flops"] == 3 * record["forward_flops_per_sample"] * 5 * 16
    # one held-out shard per partition, drawn as split_shards draws it for the run's seed
    for k, held in enumerate(record["heldout_shards"]):
        m = load_manifest(rd.partition(k))
        urls = shard_paths(rd.partition(k), m)
        sizes = [s["num_samples"] for s in m["shards"]]
        _, expected = split_shards(urls, sizes, float(cfg.router.sample_fraction), router_shards_seed(cfg.seed, k))
        assert held == [Path(u).name for u in expected]


def test_resume_refuses_a_checkpoint_of_another_clustering(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=4", "expert.ckpt_every=2")
    original = _crash_at(monkeypatch, train_expert.ExpertModule, 3)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_expert.run(cfg)
    monkeypatch.setattr(train_expert.ExpertModule, "training_step", original)
    shutil.rmtree(rd.partitions)
    make_partitions(tmp_path / "run", clustering_id="beef")  # the data were re-clustered meanwhile
    with pytest.raises(ValueError, match=r"other data.*c0ffee.*beef.*redo=true"):
        train_expert.run(cfg)
    assert train_expert.run(fast_cfg("expert.steps=4", "expert.ckpt_every=2", "redo=true"))["steps"] == 4


def test_a_finished_expert_of_another_clustering_is_not_reused(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    train_expert.run(fast_cfg("expert.steps=2"))
    shutil.rmtree(rd.partitions)
    make_partitions(tmp_path / "run", clustering_id="beef")
    with pytest.raises(ValueError, match=r"clustering c0ffee.*now clustering beef.*redo=true"):
        train_expert.run(fast_cfg("expert.steps=2"))


def test_router_signal_saves_and_stops_in_process(fast_cfg, tmp_path, monkeypatch):
    import os
    import signal

    from ddm.train.signals import Preempted

    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = fast_cfg("router.steps=6", "router.ckpt_every=4", "router.eval_samples=20")
    original = train_router.RouterModule.training_step
    handler_before = signal.getsignal(signal.SIGTERM)

    def signalled(self, batch, idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step must still complete
        return original(self, batch, idx)

    monkeypatch.setattr(train_router.RouterModule, "training_step", signalled)
    with pytest.raises(Preempted) as stopped:
        train_router.run(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(rd.router / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not rd.router_record.exists() and not (rd.router / "failed.json").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the stage gave the signal back

    monkeypatch.setattr(train_router.RouterModule, "training_step", original)
    record = train_router.run(cfg)
    assert record["steps"] == 6 and record["resumed_from_step"] == 3


def test_expert_reads_its_shards_from_a_url(fast_cfg, tmp_path):
    """An island that keeps only the manifest locally fetches its shards through webdataset (here `pipe:cat`)."""
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    remote = tmp_path / "object-store" / "cluster-01"
    remote.mkdir(parents=True)
    for shard in rd.partition(1).glob("shard-*.tar"):
        shard.rename(remote / shard.name)  # nothing but manifest.json stays on the island
    template = f"pipe:cat {tmp_path}/object-store/{{folder}}/{{shard}}"
    record = train_expert.run(fast_cfg("expert.id=1", "expert.steps=3", f"expert.shard_url='{template}'"))
    assert record["steps"] == 3 and record["partition_samples"] == 20
    with pytest.raises(ValueError, match="must contain"):
        train_expert.run(fast_cfg("expert.id=0", "expert.steps=3", "expert.shard_url=pipe:cat"))
