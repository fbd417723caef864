"""Routing that follows the noise: schedules of strategies over t (ddm.routing_schedule, Ensemble, the FLOP formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble
from ddm.errors import BadInput
from ddm.eval.flops import measured_sampling_flops, model_forward_flops, sampling_flops_per_image
from ddm.flow import FlowPath
from ddm.routing_schedule import Schedule, check_strategy, parse_strategy
from ddm.sampling.solvers import evaluation_times, sample
from tests.test_eval_metrics import _tiny_ensemble


def test_a_schedule_reads_from_noise_to_data():
    s = parse_strategy("full:0.6:top1")
    assert s == Schedule(("full", "top1"), (0.6,)) and s.first == "full" and not s.one_hot
    assert parse_strategy("top1") == Schedule(("top1",)) and parse_strategy("top1").single == "top1"
    assert parse_strategy("sample:0.5:top1").one_hot
    assert check_strategy(" topk : 0.80 : sample : 0.3 : top1 ") == "topk:0.8:sample:0.3:top1"
    three = parse_strategy("topk:0.8:sample:0.3:top1")
    assert [three.strategy_at(t) for t in (1.0, 0.81, 0.8, 0.5, 0.3, 0.29, 0.0)] == [
        "topk",
        "topk",
        "sample",
        "sample",
        "top1",
        "top1",
        "top1",
    ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("best", r"sample.strategy='best' is not one of"),
        ("full:0.6", r"must alternate strategies and switch points"),
        ("full:0.6:threshold", r"'threshold' cannot be a piece of a schedule"),
        ("full:high:top1", r"switch point 'high' is not a number"),
        ("full:0.3:topk:0.6:top1", r"must lie strictly between 0 and 1 and decrease"),
        ("full:1.0:top1", r"must lie strictly between 0 and 1"),
        ("full:0:top1", r"must lie strictly between 0 and 1"),
    ],
)
def test_a_bad_schedule_is_refused_with_its_key(spec, message):
    with pytest.raises(BadInput, match=message):
        parse_strategy(spec)
    with pytest.raises(BadInput, match="eval.strategies="):
        check_strategy(spec, key="eval.strategies")


class ConstantExpert(nn.Module):
    """v = its id everywhere: which expert ran, and with which weight, reads off the output."""

    num_classes = 0

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, y=None):
        return torch.full_like(x, self.value)


class FixedRouter(nn.Module):
    """The same posterior for every input: p = (0.5, 0.3, 0.2)."""

    num_outputs = 3

    def forward(self, x, t, y=None):
        return torch.tensor([0.5, 0.3, 0.2]).log().expand(x.shape[0], 3)


def test_each_row_is_routed_by_the_piece_its_t_falls_in_switching_exactly_at_the_set_t():
    ens = Ensemble([ConstantExpert(v) for v in (1.0, 10.0, 100.0)], FixedRouter(), strategy="full:0.6:top1")
    switch = torch.tensor(0.6, dtype=torch.float32)
    above = torch.nextafter(switch, torch.tensor(1.0))
    t = torch.stack([torch.tensor(1.0), above, switch, torch.nextafter(switch, torch.tensor(0.0)), torch.tensor(0.0)])
    v = ens(torch.zeros(5, 1), t)
    full = 0.5 * 1.0 + 0.3 * 10.0 + 0.2 * 100.0
    assert v.flatten().tolist() == pytest.approx([full, full, 1.0, 1.0, 1.0])
    selected, weights = ens.route(torch.zeros(5, 1), t)
    assert selected.sum(1).tolist() == [3, 3, 1, 1, 1]
    assert weights[2:].tolist() == [[1.0, 0.0, 0.0]] * 3


def test_a_sampling_run_switches_at_the_set_t_of_the_time_grid():
    """Euler on 10 steps: t = 1, 0.9, ..., 0.1. Under full:0.5:top1 the calls above 0.5 run every expert on every
    sample and the calls at and below it one expert per sample; the usage records say so call by call."""
    ens = Ensemble([ConstantExpert(v) for v in (1.0, 10.0, 100.0)], FixedRouter(), strategy="full:0.5:top1")
    sample(ens, FlowPath(), (4, 1), steps=10, generator=torch.Generator().manual_seed(0))
    times = evaluation_times(FlowPath(), 10, "euler")
    assert [round(r["t"], 6) for r in ens.usage] == [round(t, 6) for t in times]
    per_call = [sum(r["counts"]) for r in ens.usage]
    assert per_call == [12 if t > np.float32(0.5) else 4 for t in times] == [12] * 5 + [4] * 5


def test_a_schedule_of_one_hot_pieces_equals_its_pieces_bit_for_bit():
    """sample:0.5:top1 on the rows of each piece gives what sample and top1 give (no weight multiplies)."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Unflatten(1, (1, 4))) for _ in range(3)]
    for e in experts:
        e.num_classes = 0

    class Wrap(nn.Module):
        num_classes = 0

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y=None):
            return self.net(x) * t.reshape(-1, 1, 1)

    models = [Wrap(e) for e in experts]
    x = torch.randn(6, 1, 4)
    high, low = torch.full((6,), 0.9), torch.full((6,), 0.2)
    sched = Ensemble(models, FixedRouter(), strategy="sample:0.5:top1", generator=torch.Generator().manual_seed(3))
    plain = Ensemble(models, FixedRouter(), strategy="sample", generator=torch.Generator().manual_seed(3))
    assert torch.equal(sched(x, high), plain(x, high))
    assert torch.equal(sched(x, low), Ensemble(models, FixedRouter(), strategy="top1")(x, low))


@pytest.mark.parametrize(
    "strategy,solver,interval,cfg_routing",
    [
        ("full:0.55:top1", "euler", (0.2, 0.8), "shared"),  # the guidance interval crosses the switch
        ("topk:0.7:sample:0.3:top1", "heun", None, "shared"),
        ("full:0.5:top1", "euler", (0.3, 0.9), "separate"),
    ],
)
def test_the_flop_formula_of_a_schedule_matches_a_counted_run(strategy, solver, interval, cfg_routing):
    ens = _tiny_ensemble(strategy, top_k=2, cfg_routing=cfg_routing)
    shape = (1, 8, 8)
    expert, router = model_forward_flops(ens.experts["0"], shape), model_forward_flops(ens.router, shape)
    kw = dict(steps=6, solver=solver, cfg_scale=2.0, num_experts=3, top_k=2, cfg_interval=interval)
    formula = sampling_flops_per_image(expert, router, strategy, cfg_routing=cfg_routing, **kw)
    measured = measured_sampling_flops(
        ens, FlowPath(), shape, torch.tensor([0, 1, 2]), steps=6, solver=solver, cfg_scale=2.0, cfg_interval=interval
    )
    assert measured == formula["per_image"]
    pieces = formula["schedule"]
    assert sum(p["calls"] for p in pieces) == formula["calls"] and all(p["calls"] > 0 for p in pieces)
    # between its cheapest and its costliest piece run on every call
    first, last = strategy.split(":")[0], strategy.split(":")[-1]
    ends = [
        sampling_flops_per_image(expert, router, s, cfg_routing=cfg_routing, **kw)["per_image"] for s in (last, first)
    ]
    assert min(ends) < formula["per_image"] < max(ends)
