"""FSDP2 under ``precision: bf16-mixed``: parameters gathered in bf16, gradients reduced in fp32.

Without a policy FSDP2 all-gathers fp32 parameters and reduce-scatters fp32
gradients: twice the bytes of every gather, for weights that autocast turns into
bf16 for each matmul anyway. Proved on a one-rank gloo group in this process:
each unit's policy, the dtype a block's weights have while it runs, and what is
kept (fp32 sharded weights and gradients).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ddm.models.dit import DiT
from ddm.train.fsdp import island_strategy, mixed_precision_policy, shard_network, unit_policies
from tests.fsdp_island import MODEL, island_config


@pytest.fixture
def one_rank_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(mesh, precision: str) -> DiT:
    torch.manual_seed(0)
    net = DiT(**MODEL)
    for p in net.parameters():  # adaLN-Zero starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return shard_network(net, mesh, mixed_precision_policy(precision))


def _weight_dtypes_while_running(net: DiT) -> list[torch.dtype]:
    seen = []
    linear = net.trunk.blocks[0].ada[-1]
    linear.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y)
    out.float().square().mean().backward()
    return seen


def test_every_unit_gathers_bf16_and_reduces_fp32_under_bf16_mixed(one_rank_group):
    net = _sharded(one_rank_group, "bf16-mixed")
    policies = unit_policies(net)
    assert sorted(policies) == ["", "trunk.blocks.0", "trunk.blocks.1"]
    for name, policy in policies.items():
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32), name
        assert policy.cast_forward_inputs is False, name  # t and the residual stream stay fp32
    assert _weight_dtypes_while_running(net) == [torch.bfloat16]
    # what is kept between steps is fp32: the sharded weights the optimizer and the EMA read, and their gradients
    for name, p in net.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


def test_full_precision_islands_gather_in_the_parameters_own_dtype(one_rank_group):
    net = _sharded(one_rank_group, "32-true")
    for policy in unit_policies(net).values():
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)
    assert _weight_dtypes_while_running(net) == [torch.float32]


def test_the_island_strategy_takes_its_policy_from_the_island_precision():
    bf16 = island_config("fsdp", 1, 2)
    bf16.precision = "bf16-mixed"
    assert island_strategy(bf16).mp_policy.param_dtype == torch.bfloat16
    assert island_strategy(island_config("fsdp", 1, 2)).mp_policy.param_dtype is None  # 32-true
