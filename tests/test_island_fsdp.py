"""FSDP inside one island: CPU processes (gloo) shard an expert per DiT block, its EMA alike.

The island tests start real ranks (``tests.fsdp_island``) and compare what they
trained with the same training unsharded in this process; the job test runs
``ddm train-expert`` on two ranks as a user would. Lightning's own
``FSDPStrategy`` (FSDP1) cannot run here: with ``accelerator=cpu`` it stops with
"The strategy `fsdp` requires a GPU accelerator" (and FSDP1 given no device with
"FSDP needs a non-CPU accelerator device, but no accelerator device is
detected"); ddm's strategy is FSDP2, which runs on CPU with gloo and on GPUs
with NCCL alike. The GPU test runs the same job where two GPUs exist.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.io import read_json
from ddm.models.dit import DiT
from ddm.sampling import load_expert, load_router, sample
from ddm.sampling.checkpoints import verify_weights
from ddm.train.checkpoint_io import inspect_checkpoint, latest_complete_checkpoint
from ddm.train.fsdp import FSDPIslandStrategy, island_strategy
from ddm.train.trainer import ActivationCheckpointing, build_trainer
from tests.fabricate import FAST_JOB, make_partitions, train_expert_on_two_ranks
from tests.fsdp_island import MODEL, STEPS, MomentumExpert, island_config, reference, start_island, train

BLOCK_UNITS = ["", "trunk.blocks.0", "trunk.blocks.1"]  # the network itself, then each of DiT-N's 2 blocks


def _ran(procs, out) -> None:
    logs = "\n".join((out / f"rank-{r}.log").read_text()[-2000:] for r in range(len(procs)))
    assert all(p.returncode == 0 for p in procs), logs


@pytest.fixture(scope="module")
def island(tmp_path_factory):
    """One 2-rank island (full sharding) and the unsharded reference of the same training."""
    out = tmp_path_factory.mktemp("island")
    train(out / "crossed", island_config("auto", 1, 1), rank=0, world=1, steps=2)  # the island resumes from it
    procs = start_island(out, nodes=1, devices=2, sharding="full")
    _ran(procs, out)
    return dict(out=out, **torch.load(out / "result.pt", weights_only=False), reference=reference(out / "reference"))


def _assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


# ---- the strategy object, in this process --------------------------------------------------------
def test_an_fsdp_island_gets_the_sharding_strategy_and_other_islands_keep_their_name(tmp_path):
    assert island_strategy(island_config("auto", 1, 1)) == "auto"
    assert island_strategy(island_config("ddp", 1, 2)) == "ddp"
    hybrid = island_strategy(island_config("fsdp", 2, 8, sharding="hybrid"))
    assert isinstance(hybrid, FSDPIslandStrategy) and hybrid.sharding == "hybrid"
    trainer = build_trainer(island_config("fsdp", 1, 2, checkpointing=True), tmp_path, 4, ckpt_every=2, logger=False)
    assert isinstance(trainer.strategy, FSDPIslandStrategy) and trainer.strategy.sharding == "full"
    assert any(isinstance(c, ActivationCheckpointing) for c in trainer.callbacks)
    plain = build_trainer(island_config("auto", 1, 1), tmp_path, 4, ckpt_every=2, logger=False)
    assert not any(isinstance(c, ActivationCheckpointing) for c in plain.callbacks)


@pytest.mark.parametrize(
    "island, named",
    [
        (island_config("fsdp", 1, 2, sharding="zero3"), "island.sharding='zero3'"),
        (island_config("fsdp_cpu_offload", 1, 2), "island.strategy='fsdp_cpu_offload'"),
        (island_config("fsdp", 1, "auto"), "island.devices='auto'"),
    ],
)
def test_an_fsdp_island_it_cannot_shard_is_named(island, named):
    with pytest.raises(BadInput, match=named.replace(".", r"\.")):
        island_strategy(island)


def test_activation_checkpointing_recomputes_each_block_and_changes_no_gradient():
    def grads_and_block_calls(recompute: bool):
        torch.manual_seed(0)
        net = DiT(**MODEL)
        torch.nn.init.normal_(net.trunk.blocks[0].ada[-1].weight)  # adaLN-Zero starts blocks as identities
        net.trunk.checkpoint_blocks = recompute
        calls = []
        net.trunk.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 0])
        net(x, t, y).square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads_and_block_calls(False)
    recomputed, recomputed_calls = grads_and_block_calls(True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # the block ran again in the backward pass
    _assert_same_weights(recomputed, plain, "gradient")


# ---- a 2-rank island ------------------------------------------------------------------------------
def test_each_dit_block_of_the_network_and_of_its_ema_is_its_own_fsdp_unit(island):
    for run in (island["straight"], island["resumed"]):
        assert run["net_units"] == BLOCK_UNITS and run["ema_units"] == BLOCK_UNITS
        for name, (kind, placements, shape, local) in run["shards"].items():
            # every parameter split on its first dimension over the 2 ranks, none kept whole
            assert (kind, placements) == ("DTensor", "(Shard(dim=0),)"), name
            assert local <= math.ceil(shape[0] / 2) * math.prod(shape[1:]), name


def test_the_ema_is_sharded_like_the_network_and_is_not_trained(island):
    shards = island["straight"]["shards"]
    for name, layout in shards.items():
        if name.startswith("ema."):
            assert layout == shards["net." + name[4:]], name
    assert not island["straight"]["ema_in_optimizer"] and not island["straight"]["ema_requires_grad"]


def test_sharded_training_gives_the_ema_of_unsharded_training(island):
    ref, run = island["reference"], island["straight"]
    assert run["steps"] == ref["steps"] == STEPS
    _assert_same_weights(run["net"], ref["net"], "network")
    _assert_same_weights(run["ema"], ref["ema"], "EMA")
    moved = max((ref["ema"][k] - ref["init"][k]).abs().max().item() for k in ref["init"])
    assert moved > 1e-2  # the EMA left its start: this compares trained weights
    unclipped = reference(island["out"] / "unclipped", grad_clip=None)["net"]
    assert max((unclipped[k] - ref["net"][k]).abs().max().item() for k in unclipped) > 1e-3  # clipping acted
    assert run["ema_class"] == "DiT"  # gathered into a plain network


def test_a_resumed_sharded_job_with_activation_checkpointing_ends_where_a_straight_one_does(island):
    run, straight = island["resumed"], island["straight"]
    assert run["resumed_from"].endswith("last.ckpt") and run["steps"] == STEPS
    _assert_same_weights(run["net"], island["reference"]["net"], "network")
    _assert_same_weights(run["ema"], island["reference"]["ema"], "EMA")
    # 2 steps after the resume, each running block 0 forward and once more in the backward pass
    assert (straight["block0_forwards"], run["block0_forwards"]) == (STEPS, 2 * 2)


def test_a_sharded_jobs_checkpoint_holds_the_full_state_in_one_file(island):
    ckpt_dir = island["out"] / "straight" / "checkpoints"
    path = latest_complete_checkpoint(ckpt_dir)
    assert path == ckpt_dir / "last.ckpt" and path.is_file()
    ckpt, problem = inspect_checkpoint(path)
    assert problem is None and ckpt["global_step"] == STEPS
    torch.manual_seed(0)
    whole = MomentumExpert(model=MODEL, flow=dict(schedule="linear")).state_dict()
    assert {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()} == {k: tuple(v.shape) for k, v in whole.items()}
    _assert_same_weights(
        {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}, island["straight"]["ema"], "EMA"
    )
    momentum = [s["momentum_buffer"] for s in ckpt["optimizer_states"][0]["state"].values()]
    net_shapes = [tuple(v.shape) for k, v in whole.items() if k.startswith("net.")]
    assert [tuple(m.shape) for m in momentum] == net_shapes  # the optimizer state, gathered too


def test_checkpoints_resume_across_sharded_and_unsharded_islands(island, tmp_path):
    ref = island["reference"]
    crossed = island["crossed"]  # 2 unsharded steps, then sharded on 2 ranks
    assert crossed["resumed_from"].endswith("last.ckpt") and crossed["steps"] == STEPS
    _assert_same_weights(crossed["net"], ref["net"], "network")
    _assert_same_weights(crossed["ema"], ref["ema"], "EMA")
    # and the other way: 2 sharded steps (the island's resumed run left them), then one process
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(island["out"] / "resumed" / "checkpoints" / "step-0000002.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    unsharded = train(tmp_path, island_config("auto", 1, 1), rank=0, world=1, steps=STEPS, resume=True)
    _assert_same_weights(unsharded["net"], ref["net"], "network")
    _assert_same_weights(unsharded["ema"], ref["ema"], "EMA")


@pytest.mark.slow
def test_a_hybrid_island_shards_within_a_node_and_replicates_across_nodes(tmp_path):
    procs = start_island(tmp_path, nodes=2, devices=2, sharding="hybrid", runs="straight")
    _ran(procs, tmp_path)
    run = torch.load(tmp_path / "result.pt", weights_only=False)["straight"]
    ref = reference(tmp_path / "reference")
    assert run["net_units"] == BLOCK_UNITS and run["ema_units"] == BLOCK_UNITS
    assert {placements for _, placements, _, _ in run["shards"].values()} == {"(Replicate(), Shard(dim=0))"}
    _assert_same_weights(run["ema"], ref["ema"], "EMA")


# ---- the job, as a user starts it ------------------------------------------------------------------
def _check_exported(rd, k: int) -> DiT:
    verify_weights(rd.expert_weights(k), rd.expert_record(k))
    net, meta = load_expert(rd.expert_weights(k))
    fresh = DiT(**meta["model_config"]).state_dict()
    assert {n: tuple(v.shape) for n, v in net.state_dict().items()} == {n: tuple(v.shape) for n, v in fresh.items()}
    x = sample(net, FlowPath(**meta["flow"]), (3, 1, 8, 8), y=torch.tensor([0, 1, 2]), steps=2, cfg_scale=1.5)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    return net


def test_a_two_rank_fsdp_job_trains_resumes_and_exports_the_full_ema(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    fsdp = ("island.strategy=fsdp", "expert.id=1", "expert.ckpt_every=2", "expert.grad_clip=1.0")
    first = train_expert_on_two_ranks(rd, tmp_path, *fsdp, "expert.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    _check_exported(rd, 1)
    # train on from the checkpoint the job left: the record goes, the checkpoints stay
    rd.expert_record(1).unlink()
    rd.expert_weights(1).unlink()
    second = train_expert_on_two_ranks(rd, tmp_path, *fsdp, "expert.steps=4", "island.activation_checkpointing=true")
    assert second.returncode == 0, second.stderr[-3000:]
    record = read_json(rd.expert_record(1))
    assert (record["steps"], record["resumed_from_step"], record["attempts"]) == (4, 2, 2)
    assert record["hardware"]["strategy"] == "FSDPIslandStrategy" and record["hardware"]["world_size"] == 2
    net = _check_exported(rd, 1)
    ckpt = torch.load(rd.expert(1) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    _assert_same_weights(net.state_dict(), ema, "expert.pt")  # expert.pt is the EMA of the last step


def test_a_two_rank_fsdp_router_job_evaluates_and_exports_the_whole_router(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("DDM_STAGE", None)
    cmd = [sys.executable, "-m", "ddm", "train-router", f"run_dir={rd.root}", *FAST_JOB, "router.steps=2"]
    cmd += ["island.devices=2", "island.strategy=fsdp", "router.preview_every=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # the held-out accuracy runs the router on rank 0 alone: the sharded one would wait for the other rank;
    # the preview runs the sharded router on both ranks (rank 0 alone would wait), and rank 0 writes it
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_json(rd.router_record)
    assert len(record["accuracy_by_t"]) == 10 and record["steps"] == 2
    assert sorted(p.name for p in (rd.router / "previews").iterdir()) == ["step-0000002.png"]
    router, _ = load_router(rd.router_weights)
    assert router(torch.zeros(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])).shape == (2, 2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_a_two_gpu_fsdp_job_exports_the_full_ema(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    out = train_expert_on_two_ranks(
        rd,
        tmp_path,
        "island.accelerator=gpu",
        "island.precision=bf16-mixed",
        "island.strategy=fsdp",
        "island.activation_checkpointing=true",
        "expert.id=0",
        "expert.steps=4",
        "expert.ckpt_every=2",
        "expert.grad_clip=1.0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_json(rd.expert_record(0))["hardware"]["strategy"] == "FSDPIslandStrategy"
    _check_exported(rd, 0)
