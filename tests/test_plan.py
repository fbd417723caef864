"""``ddm plan``: sizes, FLOPs, memory per GPU and GPU-days of a preset, computed without allocating it."""

from __future__ import annotations

import pytest
import torch

from ddm.errors import BadInput
from ddm.eval.flops import count_flops
from ddm.models.dit import DiT
from ddm.stages.runner import run_stage


def test_the_imagenet_preset_plans_dit_xl2_experts_on_latents(make_cfg, capsys):
    cfg = make_cfg("experiment=imagenet256", "data.root=/nowhere", "plan.images_per_s=100")
    expert, router = run_stage("plan", cfg)["rows"]
    out = capsys.readouterr().out
    assert "| expert | DiT-XL/2 | 8 |" in out and "(measured)" in out
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
    cfg = make_cfg("experiment=imagenet256", "data.root=/nowhere", "island=gpu16_2node_fsdp", "island.sharding=full")
    expert, _ = run_stage("plan", cfg)["rows"]
    assert expert["gpus_per_job"] == 16
    assert expert["state_gib_per_gpu"] == pytest.approx(expert["params"] * 20 / 16 / 2**30)
    seconds = 400_000 * expert["step_flops"] / (0.4 * 989 * 1e12 * 16)
    assert expert["days_per_job"] == pytest.approx(seconds / 86400)
    assert "40% MFU of 989 TFLOP/s (assumed)" in capsys.readouterr().out
    with pytest.raises(BadInput, match="plan.mfu"):
        run_stage("plan", make_cfg("experiment=imagenet256", "data.root=/nowhere", "plan.mfu=2"))


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
