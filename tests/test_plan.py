"""``ddm plan``: sizes, FLOPs, memory per GPU and GPU-days of a preset, computed without allocating it."""

from __future__ import annotations

import re

import pytest
import torch

from ddm.errors import BadInput
from ddm.eval.flops import count_flops
from ddm.models.dit import DiT
from ddm.stages.plan import allreduce_seconds, assumed_mfu
from ddm.stages.runner import run_stage


def test_the_imagenet_preset_plans_dit_xl2_experts_on_latents(make_cfg, capsys):
    cfg = make_cfg("experiment=imagenet256", "data.root=/nowhere", "plan.images_per_s=100", "island=gpu8_ddp")
    expert, router = run_stage("plan", cfg)["rows"]
    out = capsys.readouterr().out
    assert "| expert | DiT-XL/2 | 8 |" in out and "(measured)" in out
    # a measured throughput is used as given, and the plan says at which per-GPU batch to measure it
    assert "this plan runs 4 per GPU (scripts/bench_train.py --batch 4)" in out
    net = DiT("DiT-XL/2", 32, 4, 1000)
    forward = count_flops(net, torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert expert["input"] == "4x32x32" and expert["params"] == sum(p.numel() for p in net.parameters())
    assert expert["forward_flops"] == forward and expert["step_flops"] == 3 * forward * 32
    # 400k steps x 32 images at 100 images/s on each of 8 GPUs, for each of 8 experts
    assert expert["days_per_job"] == pytest.approx(400_000 * 32 / (100 * 8) / 86400)
    assert expert["gpu_days"] == pytest.approx(expert["days_per_job"] * 8 * 8)
    assert expert["state_gib_per_gpu"] == pytest.approx(expert["params"] * 20 / 2**30)  # DDP: the whole state
    assert router["size"] == "DiT-B/2" and router["count"] == 1


def test_fsdp_divides_the_state_and_the_mfu_basis_is_stated(make_cfg, capsys):
    # 256 over 16 GPUs is 16 per GPU, the full assumed MFU; no all-reduce charged between the nodes
    cfg = make_cfg(
        "experiment=imagenet256",
        "data.root=/nowhere",
        "island=gpu16_2node_fsdp",
        "island.sharding=full",
        "expert.batch_size=256",
        "plan.network_gb_s=null",
    )
    expert, _ = run_stage("plan", cfg)["rows"]
    assert expert["gpus_per_job"] == 16
    assert expert["state_gib_per_gpu"] == pytest.approx(expert["params"] * 20 / 16 / 2**30)
    seconds = 400_000 * expert["step_flops"] / (0.4 * 989 * 1e12 * 16)
    assert expert["days_per_job"] == pytest.approx(seconds / 86400)
    assert "40% MFU of 989 TFLOP/s (assumed)" in capsys.readouterr().out
    with pytest.raises(BadInput, match="plan.mfu"):
        run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/nowhere", "plan.mfu=2"))


def test_the_imagenet_preset_trains_one_expert_per_gpu_on_flipped_latents(make_cfg, capsys):
    cfg = make_cfg("experiment=imagenet256", "data.root=/nowhere")
    assert cfg.island.accelerator == "gpu" and cfg.island.devices == 1 and cfg.island.num_nodes == 1
    assert cfg.vae.flip is True and cfg.pipeline.parallel == "auto"
    result = run_stage("plan", cfg)
    expert, router = result["rows"]
    out = capsys.readouterr().out
    assert "experts: 8 jobs x 1 GPU; 8 GPUs in all; 32 images per GPU per step" in out
    assert "router: 1 job x 1 GPU; 256 images per GPU per step" in out
    assert expert["per_gpu_batch"] == 32 and expert["gpus_per_job"] == 1 and expert["allreduce_s_per_step"] == 0
    assert expert["mfu"] == pytest.approx(0.4) and result["warnings"] == [] and "WARNING" not in out
    # one GPU at the full assumed MFU: 400k steps of 3 x forward x 32 images
    seconds = 400_000 * expert["step_flops"] / (0.4 * 989e12)
    assert expert["gpu_days"] == pytest.approx(seconds * 8 / 86400)


def test_an_8_gpu_island_at_batch_32_is_warned_about_and_costs_more(make_cfg, capsys, caplog):
    one_gpu, _ = run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/nowhere"))["rows"]
    capsys.readouterr()
    result = run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/nowhere", "island=gpu8_ddp"))
    expert, router = result["rows"]
    out = capsys.readouterr().out
    assert "experts: 8 jobs x 8 GPUs (ddp); 64 GPUs in all; 4 images per GPU per step" in out
    assert expert["per_gpu_batch"] == 4 and router["per_gpu_batch"] == 32
    # 40% MFU from 16 images per GPU up, so a quarter of it at 4; plus an fp32 gradient ring all-reduce
    # over 8 GPUs at 300 GB/s, once per step
    assert expert["mfu"] == pytest.approx(0.1) and router["mfu"] == pytest.approx(0.4)
    compute = expert["step_flops"] / (0.1 * 989e12 * 8)
    allreduce = 2 * 7 / 8 * expert["params"] * 4 / 300e9
    assert expert["allreduce_s_per_step"] == pytest.approx(allreduce)
    assert expert["days_per_job"] == pytest.approx(400_000 * (compute + allreduce) / 86400)
    assert expert["gpu_days"] == pytest.approx(expert["days_per_job"] * 8 * 8)
    assert expert["gpu_days"] > 4 * one_gpu["gpu_days"]
    assert "10% MFU of 989 TFLOP/s (assumed: 40% from 16 images per GPU up, x 4/16)" in out
    # the expert (675M parameters at 4 per GPU) is warned about, in the log and the output; the router is not
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("expert: each GPU computes 4 images")
    assert "WARNING expert: each GPU computes 4 images" in out and "island=gpu" in out
    assert any("expert: each GPU computes 4 images" in r.getMessage() for r in caplog.records)
    # the documented use of the 8-GPU island: a batch that fills it
    big = run_stage(
        "plan", make_cfg("experiment=imagenet256", "data.root=/nowhere", "island=gpu8_ddp", "expert.batch_size=256")
    )
    assert big["rows"][0]["per_gpu_batch"] == 32 and big["rows"][0]["mfu"] == pytest.approx(0.4)
    assert big["warnings"] == []


def test_the_utilisation_model_with_known_numbers():
    assert assumed_mfu(0.4, 4, 16) == pytest.approx(0.1)
    assert assumed_mfu(0.4, 16, 16) == pytest.approx(0.4) and assumed_mfu(0.4, 256, 16) == pytest.approx(0.4)
    assert assumed_mfu(0.5, 8, 32) == pytest.approx(0.125)
    # 1e9 fp32 gradients = 4 GB; a ring over 8 GPUs moves 2 x 7/8 of it per GPU: 7 GB at 100 GB/s
    assert allreduce_seconds(1_000_000_000, 8, 100) == pytest.approx(0.07)
    assert allreduce_seconds(1_000_000_000, 2, 50) == pytest.approx(0.08)
    assert allreduce_seconds(1_000_000_000, 1, 100) == 0 and allreduce_seconds(1_000_000_000, 8, None) == 0


def test_a_multi_node_island_all_reduces_over_the_network(make_cfg):
    cfg = make_cfg("experiment=imagenet256", "data.root=/nowhere", "island=gpu16_2node_fsdp", "expert.batch_size=256")
    expert, _ = run_stage("plan", cfg)["rows"]
    assert expert["allreduce_s_per_step"] == pytest.approx(2 * 15 / 16 * expert["params"] * 4 / 40e9)


@pytest.mark.parametrize(
    "override,named",
    [
        ("expert.batch_size=36", "expert.batch_size=36"),  # not a multiple of the island's 8 GPUs
        ("plan.mfu_batch=0", "plan.mfu_batch"),
        ("plan.nvlink_gb_s=-1", "plan.nvlink_gb_s"),
        ("plan.images_per_s=0", "plan.images_per_s"),
        ("plan.peak_tflops=fast", "plan.peak_tflops"),
    ],
)
def test_bad_plan_input_is_named(make_cfg, override, named):
    with pytest.raises(BadInput, match=re.escape(named)):  # a value of the wrong type is refused at the door
        run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/nowhere", "island=gpu8_ddp", override))


def test_the_text_preset_plans_text_experts(make_cfg):
    expert, router = run_stage("plan", make_cfg("experiment=t2i", "data.urls=/x.tar"))["rows"]
    assert expert["size"] == "DiT-XL/2" and expert["params"] > 674e6  # cross-attention adds weights


def test_attention_flops_are_counted_on_cpu():
    """QK^T and AV of every block: 2 x 2 x tokens^2 x hidden per block, beside the linear layers."""
    net = DiT("DiT-XL/2", 32, 4, 1000)
    args = (torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with torch.device("meta"):
        meta_net = DiT("DiT-XL/2", 32, 4, 1000)
    meta_args = tuple(a.to("meta") for a in args)
    assert count_flops(net, *args) == count_flops(meta_net, *meta_args)
    tokens, hidden, depth = 256, 1152, 28
    without = 237_233_405_952 - depth * 2 * 2 * tokens**2 * hidden
    assert count_flops(net, *args) - without == depth * 2 * 2 * tokens**2 * hidden


def test_an_island_of_auto_devices_is_refused_naming_the_setting(make_cfg):
    with pytest.raises(BadInput, match=r"island\.devices='auto'.*give both as numbers"):
        run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/x", "island.devices=auto"))
