"""FSDP2 under ``precision: bf16-mixed``: parameters gathered in bf16, gradients reduced in fp32.

Without a policy FSDP2 all-gathers fp32 parameters and reduce-scatters fp32
gradients: twice the bytes of every gather, for weights that autocast turns into
bf16 for each matmul anyway. Proved on a one-rank gloo group in this process:
each unit's policy, the dtype a block's weights have while it runs, and what is
kept (fp32 sharded weights and gradients).
"""

from __future__ import annotations

from types import SimpleNamespace

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
    bf16 = island_config("fsdp", 1, 2, precision="bf16-mixed")
    assert island_strategy(bf16).policy_for("cuda").param_dtype == torch.bfloat16
    assert island_strategy(bf16).policy_for("cpu").param_dtype is None  # see mixed_precision_policy
    assert island_strategy(island_config("fsdp", 1, 2)).policy_for("cuda").param_dtype is None  # 32-true


def test_a_preview_of_a_bf16_gathering_island_runs_under_its_autocast(one_rank_group, tmp_path):
    # Previews run in a callback, outside the autocast Lightning puts around training steps: without the
    # island's precision context, fp32 noise meets the bf16 weights the policy gathers and the conv refuses it.
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ddm.train.modules import ExpertModule
    from ddm.train.preview import Preview

    module = ExpertModule(model=MODEL, flow={})
    for p in module.ema.parameters():
        torch.nn.init.normal_(p, std=0.05)
    shard_network(module.ema, one_rank_group, mixed_precision_policy("bf16-mixed"))
    labels = torch.tensor([0, 1, 2, 0])
    preview = Preview(2, tmp_path, (1, 8, 8), ["a", "b"], 2, condition=lambda m: labels, steps=2)
    with pytest.raises(RuntimeError, match="should be the same"):
        preview.grid(module)  # no trainer: no autocast, as a callback would run it before
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    images = preview.grid(module)
    assert len(images) == 4 and images.dtype.name == "uint8" and images.std() > 0


def test_a_router_preview_runs_under_the_islands_autocast(tmp_path):
    # (a sharded router cannot run bf16-gathered on CPU, see mixed_precision_policy: the autocast itself is checked)
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ddm.train.modules import RouterModule
    from ddm.train.router_preview import RouterPreview

    module = RouterModule(model=dict(MODEL, num_outputs=2), flow={})
    seen = []
    module.net.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    x0, k = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 1])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    preview = RouterPreview(2, tmp_path, x0, k, lambda m: labels, torch.tensor([0.5, 0.5]), buckets=2, seed=0)
    preview.rows(module)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    preview.rows(module)
    assert seen and not any(seen[: len(seen) // 2]) and all(seen[len(seen) // 2 :])
