"""Offloaded experts: the same samples bit for bit, each expert moved at most once per model call, and the
device budget kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble
from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.sampling import sample
from ddm.sampling.draw import offloaded, rerouted
from ddm.sampling.offload import GB, FetchedExpert, OffloadedExperts, offload
from ddm.settings.sampling import Sample

K, C, B, D = 4, 3, 48, 5  # experts, classes, batch, feature size
EXPERT_PARAMS = 3 * D + (C + 1) * D  # a, b, c and the label table
EXPERT_BYTES = EXPERT_PARAMS * 8  # float64


class AffineExpert(nn.Module):
    """v = a * x + b + t c + e[y], with its weights as parameters (so they have bytes to move)."""

    num_classes = C

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b, self.c = (nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64)) for _ in range(3))
        self.e = nn.Parameter(torch.randn(C + 1, D, generator=g, dtype=torch.float64))

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        return self.a * x + self.b + t[:, None] * self.c + self.e[y]


class LinearRouter(nn.Module):
    """Logits that depend on x, t and y, so the routing changes between samples and solver steps."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_outputs = K
        self.w = torch.randn(D, K, generator=g, dtype=torch.float64)
        self.u = 3 * torch.randn(K, generator=g, dtype=torch.float64)
        self.e = torch.randn(C + 1, K, generator=g, dtype=torch.float64)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        return x @ self.w + t[:, None] * self.u + self.e[y]


def ensemble(strategy, budget_gb=None, on=True, cfg_routing="shared"):
    with torch.no_grad():
        ens = Ensemble([AffineExpert(10 + k) for k in range(K)], LinearRouter(), strategy, cfg_routing=cfg_routing)
    return offload(ens, "cpu", budget_gb) if on else ens


def draw(ens, solver="euler", cfg_scale=2.0):
    y = torch.arange(B) % C
    x1 = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        return sample(ens, FlowPath(), x1.shape, y=y, steps=6, solver=solver, cfg_scale=cfg_scale, x_init=x1)


def routed_per_call(ens) -> list[int]:
    """The distinct experts each model call ran, from the ensemble's own usage records."""
    return [
        sum(1 for k in range(K) if rec["counts"][k] or rec.get("uncond_counts", rec["counts"])[k]) for rec in ens.usage
    ]


@pytest.mark.parametrize("strategy", ["top1", "topk", "full"])
@pytest.mark.parametrize("budget", [None, 2, K])
@pytest.mark.parametrize("solver,cfg_routing", [("euler", "shared"), ("heun", "separate")])
def test_offloaded_sampling_equals_sampling_without_it(strategy, budget, solver, cfg_routing):
    budget_gb = None if budget is None else budget * EXPERT_BYTES / GB
    want = draw(ensemble(strategy, on=False, cfg_routing=cfg_routing), solver)
    ens = ensemble(strategy, budget_gb, cfg_routing=cfg_routing)
    got = draw(ens, solver)
    assert torch.equal(got, want)
    cache = ens.offload
    routed = routed_per_call(ens)
    assert len(cache.moves_per_call) == len(routed) > 0
    # an expert moves at most once per model call, and only when it is routed to
    assert all(m <= r for m, r in zip(cache.moves_per_call, routed, strict=True))
    assert cache.experts_per_call == routed
    assert cache.peak_resident_params <= (budget or 1) * EXPERT_PARAMS
    assert cache.peak_resident_bytes <= cache.budget_bytes
    if budget == K:  # everything fits: each expert used is moved once in the whole run
        assert cache.moves == len(cache.resident) == len({k for rec in ens.usage for k in range(K) if rec["counts"][k]})


def test_top1_and_top2_route_to_several_experts_per_call():
    # the test above would say little if every call ran one expert
    for strategy in ("top1", "topk"):
        ens = ensemble(strategy)
        draw(ens)
        assert max(routed_per_call(ens)) >= 3


def test_one_expert_budget_moves_exactly_the_non_resident_experts():
    # budget null: one expert at a time. Visiting the resident expert first saves one move per call.
    ens = ensemble("full")
    draw(ens, cfg_scale=1.0)
    assert ens.offload.budget_bytes == EXPERT_BYTES
    assert ens.offload.moves_per_call == [K] + [K - 1] * (len(ens.usage) - 1)
    assert ens.offload.peak_resident_params == EXPERT_PARAMS


def test_two_expert_budget_with_full_routing_keeps_two_resident():
    ens = ensemble("full", 2 * EXPERT_BYTES / GB)
    draw(ens, cfg_scale=1.0)
    # the two resident ones run first and stay; the other two are moved in, evicting them
    assert ens.offload.moves_per_call == [K] + [K - 2] * (len(ens.usage) - 1)
    assert ens.offload.peak_resident_params == 2 * EXPERT_PARAMS
    assert len(ens.offload.resident) == 2


def test_evicted_experts_point_back_at_their_host_weights():
    ens = ensemble("full")
    host = {k: ens.experts[str(k)].a.data.data_ptr() for k in range(K)}
    draw(ens)
    ens.offload.evict_all()
    assert {k: ens.experts[str(k)].a.data.data_ptr() for k in range(K)} == host
    assert ens.offload.resident_bytes == 0


def test_rerouting_keeps_the_cache():
    ens = ensemble("top1")
    again = rerouted(ens, strategy="topk")
    assert again.offload is ens.offload
    assert torch.equal(draw(again), draw(rerouted(ensemble("top1", on=False), strategy="topk")))


def test_a_budget_below_one_expert_is_an_error_naming_the_setting():
    with pytest.raises(BadInput, match="sample.offload_budget_gb"):
        ensemble("top1", EXPERT_BYTES / 2 / GB)
    with pytest.raises(BadInput, match="sample.offload_budget_gb"):
        ensemble("top1", 0)
    with pytest.raises(BadInput, match="sample.offload_budget_gb"):
        OffloadedExperts({0: AffineExpert(0)}, "cpu", budget_bytes=EXPERT_BYTES - 1)


def test_offloaded_follows_the_sample_settings():
    base = dict(
        model="ensemble", strategy="top1", top_k=2, threshold=0.1, top_p=0.9, cfg_routing="shared", experts=None,
        temperature=1.0, solver="euler", steps=6, cfg_scale=1.0, cfg_interval=None, prompts=None,
        prompts_file=None, label_order="random", per_class=1, grid_rows=None, num_samples=0, batch_size=8, seed=0,
        device="cpu", precision="fp32", parts=1, part=None,
    )  # fmt: skip
    off = ensemble("top1", on=False)
    assert offloaded(off, Sample(**base, offload=False, offload_budget_gb=None), "cpu").offload is None
    on = offloaded(ensemble("top1", on=False), Sample(**base, offload=True, offload_budget_gb=None), "cpu")
    assert isinstance(on.offload, OffloadedExperts) and on.offload.budget_bytes == EXPERT_BYTES


def test_one_offloaded_expert_alone_gives_its_own_output_and_moves_per_call():
    plain = AffineExpert(11)
    ens = ensemble("top1", budget_gb=None)  # one expert at a time
    x, t, y = torch.randn(4, D, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.arange(4) % C
    one, two = FetchedExpert(ens.offload, 1), FetchedExpert(ens.offload, 2)
    assert one.num_classes == C and not list(one.parameters())  # the weights stay the cache's
    with torch.no_grad():
        assert torch.equal(one(x, t, y), plain(x, t, y))
        one(x, t, y)  # resident already: no move
        two(x, t, y)  # evicts expert 1
    assert ens.offload.moves_per_call[-3:] == [1, 0, 1] and list(ens.offload.resident) == [2]


def test_the_sample_stage_records_the_moves_of_offloaded_experts(tmp_path):
    from ddm.settings.values import changed
    from ddm.stages import sample as stage
    from tests.test_sampling import make_run, stage_cfg

    rd = make_run(tmp_path / "off", K=2)
    record = stage.run(changed(stage_cfg(rd.root, solver="euler", steps=2), {"sample.offload": True}))
    moved = record["offload"]
    assert moved["calls"] == 2 * 2 and moved["max_moves_per_call"] <= 2 and moved["moves"] >= 1  # 2 batches x 2
    assert moved["peak_resident_params"] <= max(sum(p.numel() for p in m.parameters()) for m in _experts(rd))


def _experts(rd):
    from ddm.sampling import load_ensemble

    ens, _, _ = load_ensemble(rd.root)
    return list(ens.experts.values())
