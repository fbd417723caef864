"""Solvers against fields with known solutions, the checkpoint loader's checks, and the sample stage."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddm.artifacts import RunDir
from ddm.config import settings
from ddm.ensemble import Ensemble
from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.io import write_json
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.velocity import VelocityModel
from ddm.sampling import load_ensemble, load_expert, num_evaluations, sample
from ddm.sampling.solvers import check_cfg_interval, evaluation_times, guided_evaluations
from ddm.settings import changed


# ---- solvers on analytic fields --------------------------------------------------------------
class ExpField(nn.Module):
    """v(x, t) = c x: x(0) = x(1) exp(-c) when integrating from t = 1 to 0."""

    def __init__(self, c):
        super().__init__()
        self.c, self.calls, self.ts = c, 0, []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.ts.append(t)
        return self.c * x


class PointFlow(nn.Module):
    """Exact flow of a one-point dataset x0 = m: v = a' m + s' (x_t - a m) / s (linear: (x_t - m) / t)."""

    def __init__(self, path, m):
        super().__init__()
        self.path, self.m = path, m

    def forward(self, x, t, y=None):
        p, tb = self.path, t[:, None]
        return p.d_alpha(tb) * self.m + p.d_sigma(tb) * (x - p.alpha(tb) * self.m) / p.sigma(tb)


def _x1(n=8, d=3):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_euler_gives_the_discrete_closed_form():
    path, c, steps = FlowPath("linear"), 1.3, 10
    x1 = _x1()
    got = sample(ExpField(c), path, x1.shape, steps=steps, solver="euler", x_init=x1)
    grid = path.time_grid(steps).double()
    factor = torch.prod(1 + c * (grid[1:] - grid[:-1]))  # x_{n+1} = x_n (1 + c h_n)
    torch.testing.assert_close(got, x1 * factor, rtol=1e-12, atol=0)


def _error(solver, steps, c=1.3):
    x1 = _x1()
    x0 = sample(ExpField(c), FlowPath("linear"), x1.shape, steps=steps, solver=solver, x_init=x1)
    return (x0 - x1 * math.exp(-c)).abs().max().item()


def test_heun_is_second_order_and_euler_first():
    e20, e40 = _error("euler", 20), _error("euler", 40)
    h20, h40 = _error("heun", 20), _error("heun", 40)
    assert 1.8 < e20 / e40 < 2.2, f"Euler should halve its error when steps double: {e20 / e40:.2f}"
    assert 3.5 < h20 / h40 < 4.5, f"Heun should quarter its error when steps double: {h20 / h40:.2f}"
    assert h20 < e20 / 20


class TimeOnly(nn.Module):
    """v(x, t) = 3 t^2, whatever x: every solver step is a quadrature of f(t) = 3 t^2 over its interval."""

    def forward(self, x, t, y=None):
        return (3 * t**2)[:, None].expand_as(x).clone()


def test_heun_on_a_time_only_field_is_the_trapezoid_rule():
    """Heun's second call is at the step's end, t_next: on dx/dt = f(t) each step is the trapezoid rule.

    Grid 1, 0.75, 0.5, 0.25, 0 (exact in float32), h = -1/4, f = 3 t^2: f = 3, 27/16, 3/4, 3/16 there.
    Three trapezoid steps, then the Euler step to t = 0 (``sample``'s documented last step):
        -1/4 * [(3 + 27/16)/2 + (27/16 + 3/4)/2 + (3/4 + 3/16)/2 + 3/16] = -1/4 * 135/32 = -135/128.
    A second call at t instead of t_next would make every step Euler: -1/4 * (3 + 27/16 + 3/4 + 3/16) = -45/32.
    """
    x1 = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    heun = sample(TimeOnly(), FlowPath(), x1.shape, steps=4, solver="heun", x_init=x1)
    torch.testing.assert_close(heun, x1 - 135 / 128, rtol=0, atol=1e-15)
    euler = sample(TimeOnly(), FlowPath(), x1.shape, steps=4, solver="euler", x_init=x1)
    torch.testing.assert_close(euler, x1 - 45 / 32, rtol=0, atol=1e-15)


def test_heun_on_a_linear_field_gives_the_second_order_taylor_factor():
    """Heun on v = c x multiplies x by 1 + c h + (c h)^2 / 2 per step (by 1 + c h on the last, Euler step)."""
    path, c, steps = FlowPath("linear"), 1.3, 10
    x1 = _x1()
    got = sample(ExpField(c), path, x1.shape, steps=steps, solver="heun", x_init=x1)
    h = (path.time_grid(steps)[1:] - path.time_grid(steps)[:-1]).double()  # float32 grid, as sample uses it
    factor = torch.prod(1 + c * h[:-1] + (c * h[:-1]) ** 2 / 2) * (1 + c * h[-1])
    torch.testing.assert_close(got, x1 * factor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_single_point_dataset_lands_on_the_point_linear_path(solver):
    path = FlowPath("linear")
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = sample(
        PointFlow(path, m),
        path,
        (16, 3),
        steps=7,
        solver=solver,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    # the exact flow is a straight line: both solvers are exact, even in 7 steps
    torch.testing.assert_close(x0, m.expand(16, 3), rtol=0, atol=1e-12)


def test_single_point_dataset_cosine_path_converges():
    path = FlowPath("cosine")
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = sample(
        PointFlow(path, m),
        path,
        (16, 3),
        steps=100,
        solver="heun",
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    # the curved path leaves the final Euler step an O(h^2) error: about 2.5e-4 here
    torch.testing.assert_close(x0, m.expand(16, 3), rtol=0, atol=5e-4)


def test_evaluation_count_and_time_inputs():
    field = ExpField(0.5)
    sample(field, FlowPath(), (4, 2), steps=5, solver="heun")
    assert field.calls == num_evaluations(5, "heun") == 9
    assert all(t.shape == (4,) and t.is_floating_point() for t in field.ts)
    assert field.ts[0][0].item() == 1.0 and min(t.min().item() for t in field.ts) > 0  # t = 0 never evaluated


class CfgSpy(VelocityModel):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.cfg_calls, self.plain_calls = 0, 0

    def forward(self, x, t, y=None):
        self.plain_calls += 1
        return torch.zeros_like(x)

    def forward_with_cfg(self, x, t, y, scale):
        self.cfg_calls += 1
        return torch.zeros_like(x)


def test_guidance_uses_the_models_forward_with_cfg():
    y = torch.zeros(4, dtype=torch.long)
    spy = CfgSpy()
    sample(spy, FlowPath(), (4, 2), y=y, steps=3, cfg_scale=2.0)
    assert (spy.cfg_calls, spy.plain_calls) == (3, 0)
    spy = CfgSpy()
    sample(spy, FlowPath(), (4, 2), y=y, steps=3, cfg_scale=1.0)
    assert (spy.cfg_calls, spy.plain_calls) == (0, 3)


class Labelled(nn.Module):
    """A plain module with a null label: velocity +1 for label 0, 0 for the null label 2."""

    num_classes = 2

    def forward(self, x, t, y):
        return (y == 0).to(x.dtype)[:, None].expand_as(x).clone()


def test_guidance_falls_back_to_guided_for_plain_modules():
    y = torch.zeros(3, dtype=torch.long)
    x1 = torch.zeros(3, 2)
    x0 = sample(Labelled(), FlowPath(), x1.shape, y=y, steps=4, cfg_scale=3.0, x_init=x1)
    # guided v = 0 + 3 (1 - 0) = 3 over a unit of time, integrated from 1 down to 0
    torch.testing.assert_close(x0, torch.full((3, 2), -3.0))


class TimedSpy(CfgSpy):
    """Records the t of each guided and each plain call."""

    def __init__(self):
        super().__init__()
        self.cfg_ts, self.plain_ts = [], []

    def forward(self, x, t, y=None):
        self.plain_ts.append(t[0].item())
        return super().forward(x, t, y)

    def forward_with_cfg(self, x, t, y, scale):
        self.cfg_ts.append(t[0].item())
        return super().forward_with_cfg(x, t, y, scale)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_guidance_interval_guides_exactly_the_calls_inside_it(solver):
    y = torch.zeros(4, dtype=torch.long)
    spy = TimedSpy()
    sample(spy, FlowPath(), (4, 2), y=y, steps=10, solver=solver, cfg_scale=2.0, cfg_interval=(0.25, 0.75))
    assert spy.cfg_ts and spy.plain_ts
    assert all(0.25 <= t <= 0.75 for t in spy.cfg_ts)
    assert all(t < 0.25 or t > 0.75 for t in spy.plain_ts)
    # every call is one or the other, and the count the FLOPs use is the count made
    assert len(spy.cfg_ts) + len(spy.plain_ts) == num_evaluations(10, solver)
    assert len(spy.cfg_ts) == guided_evaluations(FlowPath(), 10, solver, (0.25, 0.75))
    assert sorted(spy.cfg_ts + spy.plain_ts, reverse=True) == pytest.approx(evaluation_times(FlowPath(), 10, solver))
    assert guided_evaluations(FlowPath(), 10, solver, None) == num_evaluations(10, solver)


def test_guidance_interval_integrates_the_guided_field_only_inside_it():
    y = torch.zeros(3, dtype=torch.long)
    x1 = torch.zeros(3, 2)
    # Euler on the grid 1, 0.75, 0.5, 0.25: the calls at 0.75 and 0.5 are guided (v = 3), the others not (v = 1)
    x0 = sample(Labelled(), FlowPath(), x1.shape, y=y, steps=4, cfg_scale=3.0, x_init=x1, cfg_interval=(0.4, 0.8))
    torch.testing.assert_close(x0, torch.full((3, 2), -0.25 * (1 + 3 + 3 + 1)))
    # the whole of [0, 1] is the same as no interval
    full = sample(Labelled(), FlowPath(), x1.shape, y=y, steps=4, cfg_scale=3.0, x_init=x1, cfg_interval=(0.0, 1.0))
    torch.testing.assert_close(full, torch.full((3, 2), -3.0))


# Grid 1, 0.75, 0.5, 0.25, 0 (exact in float32). Labelled's guided velocity is 3, its plain one 1; each x0 below
# is -1/4 times the sum over steps of the step's velocity (Heun: the mean of its two calls, the last step Euler).
@pytest.mark.parametrize(
    "interval,solver,guided_calls,want",
    [
        # both edges on grid points: the calls at t = lo and at t = hi are inside
        ((0.5, 0.75), "euler", 2, -0.25 * (1 + 3 + 3 + 1)),
        ((0.5, 0.75), "heun", 4, -0.25 * ((1 + 3) / 2 + (3 + 3) / 2 + (3 + 1) / 2 + 1)),
        ((0.25, 0.5), "euler", 2, -0.25 * (1 + 1 + 3 + 3)),
        ((0.25, 0.5), "heun", 4, -0.25 * ((1 + 1) / 2 + (1 + 3) / 2 + (3 + 3) / 2 + 3)),
    ],
)
def test_the_guidance_interval_includes_its_edges(interval, solver, guided_calls, want):
    """``lo <= t <= hi``: a call exactly at an edge is guided (an open edge would lose those calls)."""
    y = torch.zeros(3, dtype=torch.long)
    x1 = torch.zeros(3, 2, dtype=torch.float64)
    x0 = sample(
        Labelled(), FlowPath(), x1.shape, y=y, steps=4, solver=solver, cfg_scale=3.0, x_init=x1, cfg_interval=interval
    )
    torch.testing.assert_close(x0, torch.full((3, 2), want, dtype=torch.float64), rtol=0, atol=1e-15)
    assert guided_evaluations(FlowPath(), 4, solver, interval) == guided_calls
    spy = TimedSpy()
    sample(spy, FlowPath(), (2, 2), y=y[:2], steps=4, solver=solver, cfg_scale=3.0, cfg_interval=interval)
    assert sorted(spy.cfg_ts) == [interval[0]] * (guided_calls // 2) + [interval[1]] * (guided_calls // 2)


@pytest.mark.parametrize("bad", [(0.8, 0.2), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), ("a", 1), 0.5, (0.1, 0.2, 0.3)])
def test_a_bad_guidance_interval_is_a_clear_error(bad):
    with pytest.raises(BadInput, match="sample.cfg_interval"):
        check_cfg_interval(bad)
    with pytest.raises(BadInput, match="sample.cfg_interval"):
        sample(
            CfgSpy(), FlowPath(), (2, 2), y=torch.zeros(2, dtype=torch.long), steps=2, cfg_scale=2.0, cfg_interval=bad
        )


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(ValueError, match="sample.solver='rk4'"):
        sample(ExpField(1.0), FlowPath(), (2, 2), solver="rk4")


def test_noise_is_reproducible_from_the_seed():
    a = sample(ExpField(0.0), FlowPath(), (4, 2), steps=1, generator=torch.Generator().manual_seed(5))
    b = sample(ExpField(0.0), FlowPath(), (4, 2), steps=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---- a fabricated run directory -------------------------------------------------------------
NUM_CLASSES, IMAGE = 3, 8


def _randomise(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # DiT starts with zero output (adaLN-Zero): give it a real function
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def save_expert(
    rd: RunDir,
    k: int,
    K: int,
    clustering_id="abc",
    schedule="linear",
    num_classes=NUM_CLASSES,
    expert_id=None,
    size="DiT-N/4",
    target=None,
    image=IMAGE,
    channels=1,
):
    """An expert.pt as train-expert writes it; ``target`` None: a file from before the field (velocity)."""
    net = _randomise(DiT(size=size, image_size=image, in_channels=channels, num_classes=num_classes), k)
    payload = dict(
        kind="expert",
        model_config=net.config(),
        state_dict=net.state_dict(),
        flow=FlowPath(schedule).config(),
        expert_id=k if expert_id is None else expert_id,
        num_experts=K,
        clustering_id=clustering_id,
        steps=10,
    )
    if target is not None:
        payload["target"] = target
    rd.expert(k).mkdir(parents=True, exist_ok=True)
    torch.save(payload, rd.expert_weights(k))


def save_router(rd: RunDir, K: int, clustering_id="abc", schedule="linear", num_classes=NUM_CLASSES):
    net = _randomise(
        DiTClassifier(num_outputs=K, size="DiT-N/4", image_size=IMAGE, in_channels=1, num_classes=num_classes), 100
    )
    payload = dict(
        kind="router",
        model_config=net.config(),
        state_dict=net.state_dict(),
        flow=FlowPath(schedule).config(),
        num_experts=K,
        clustering_id=clustering_id,
        steps=20,
    )
    rd.router.mkdir(parents=True, exist_ok=True)
    torch.save(payload, rd.router_weights)


def make_run(root: Path, K: int = 2, experts=None, num_classes=NUM_CLASSES) -> RunDir:
    rd = RunDir(root)
    save_router(rd, K, num_classes=num_classes)
    for k in range(K) if experts is None else experts:
        save_expert(rd, k, K, num_classes=num_classes)
    return rd


def test_load_expert_restores_the_weights(tmp_path):
    rd = make_run(tmp_path, K=2)
    net, meta = load_expert(rd.expert_weights(1))
    saved = torch.load(rd.expert_weights(1), weights_only=True)
    assert meta["expert_id"] == 1 and meta["clustering_id"] == "abc" and "state_dict" not in meta
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in net.state_dict().items())


def test_load_ensemble_builds_a_working_model(tmp_path):
    rd = make_run(tmp_path, K=2)
    ens, path, info = load_ensemble(rd.root, strategy="topk", top_k=2)
    assert isinstance(ens, Ensemble) and path.schedule == "linear"
    assert info.experts == [0, 1] and info.num_classes == NUM_CLASSES and info.clustering_id == "abc"
    x = sample(ens, path, (4, 1, IMAGE, IMAGE), y=torch.arange(4) % 3, steps=2, cfg_scale=2.0)
    assert x.shape == (4, 1, IMAGE, IMAGE) and torch.isfinite(x).all()


def test_a_damaged_expert_file_is_named_with_the_fix(tmp_path):
    from ddm.errors import Unusable

    rd = make_run(tmp_path, K=2)
    data = rd.expert_weights(1).read_bytes()
    rd.expert_weights(1).write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    with pytest.raises(Unusable, match=r"expert-01/expert.pt is damaged .*copy it again.*redo=true"):
        load_ensemble(rd.root)


def test_an_expert_file_that_differs_from_its_recorded_checksum_is_refused(tmp_path):
    from ddm.errors import Unusable
    from ddm.io import sha256_file

    rd = make_run(tmp_path, K=2)
    write_json(rd.expert_record(0), dict(weights_sha256=sha256_file(rd.expert_weights(0))))
    load_ensemble(rd.root)  # as recorded: loads
    payload = torch.load(rd.expert_weights(0), weights_only=True)
    payload["state_dict"]["final.bias"] += 1.0  # other weights under the same name: a mixed-up copy
    torch.save(payload, rd.expert_weights(0))
    with pytest.raises(Unusable, match=r"expert-00/expert.pt does not match the checksum in .*record.json"):
        load_ensemble(rd.root)


def test_loader_rejects_a_k_mismatch(tmp_path):
    rd = make_run(tmp_path, K=2)
    write_json(rd.cluster_report, dict(k=3, clustering_id="abc"))
    with pytest.raises(ValueError, match=r"trained for K=2 experts but .*report.json has K=3.*retrain the router"):
        load_ensemble(rd.root)


def test_loader_rejects_experts_beyond_the_routers_k(tmp_path):
    rd = make_run(tmp_path, K=2)
    save_expert(rd, 2, K=3)
    with pytest.raises(ValueError, match=r"holds experts \[2\] but the router .* K=2"):
        load_ensemble(rd.root)


def test_loader_rejects_a_clustering_id_mismatch(tmp_path):
    rd = make_run(tmp_path, K=2)
    save_expert(rd, 1, K=2, clustering_id="def")
    with pytest.raises(
        ValueError,
        match=r"expert 1 \(.*expert-01.*router.pt\) was trained on clustering def, but the run is clustering abc"
        r".*retrain",
    ):
        load_ensemble(rd.root)


def test_loader_rejects_a_flow_or_label_mismatch(tmp_path):
    rd = make_run(tmp_path, K=2)
    save_expert(rd, 0, K=2, schedule="cosine")
    with pytest.raises(ValueError, match="flow path"):
        load_ensemble(rd.root)
    save_expert(rd, 0, K=2, num_classes=5)
    with pytest.raises(ValueError, match="num_classes mismatch"):
        load_ensemble(rd.root)


def test_loader_lists_missing_experts_unless_a_subset_is_given(tmp_path):
    rd = make_run(tmp_path, K=4, experts=[0, 2])
    with pytest.raises(
        FileNotFoundError,
        match=r"experts \[1, 3\] are missing.*expert-01.*"
        r"train-expert.*sample.experts=\[0, 2\]",
    ):
        load_ensemble(rd.root)
    ens, _, info = load_ensemble(rd.root, subset=[0, 2])
    assert info.experts == [0, 2] and ens.active_ids == [0, 2]
    with pytest.raises(FileNotFoundError, match=r"experts \[3\] are missing"):
        load_ensemble(rd.root, subset=[2, 3])


def test_rerouted_shares_the_loaded_modules_and_changes_only_the_routing(tmp_path):
    from ddm.sampling.draw import rerouted

    rd = make_run(tmp_path, K=4, experts=[0, 2])
    ens, _, _ = load_ensemble(rd.root, subset=[0, 2], strategy="top1", temperature=2.0)
    other = rerouted(ens, strategy="threshold", threshold=0.3, cfg_routing="separate")
    assert (other.strategy, other.threshold, other.cfg_routing) == ("threshold", 0.3, "separate")
    assert (other.temperature, other.top_k, other.top_p) == (2.0, ens.top_k, ens.top_p)  # the rest as it was
    assert other.active_ids == [0, 2] and other.num_experts == 4  # the same experts, nothing loaded again
    assert other.router is ens.router and all(other.experts[k] is ens.experts[k] for k in ("0", "2"))
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(rerouted(ens)(x, t, y), ens(x, t, y))  # no change: the same velocity
    with pytest.raises(TypeError, match="not \\['subset'\\]"):
        rerouted(ens, subset=[0])


def test_experts_of_different_sizes_and_targets_make_one_ensemble(tmp_path):
    from ddm.models.prediction import PredictionToVelocity

    rd = make_run(tmp_path, K=3, experts=[])
    save_expert(rd, 0, K=3)  # an older file: no target, so velocity
    save_expert(rd, 1, K=3, size="DiT-T/4", target="eps")
    save_expert(rd, 2, K=3, size="DiT-N/2", target="x0")
    ens, path, info = load_ensemble(rd.root, strategy="full")
    assert info.expert_models == {
        0: dict(size="DiT-N/4", target="velocity"),
        1: dict(size="DiT-T/4", target="eps"),
        2: dict(size="DiT-N/2", target="x0"),
    }
    assert isinstance(ens.experts["0"], DiT)  # a velocity expert is not wrapped
    wrapped = [ens.experts[str(k)] for k in (1, 2)]
    assert all(isinstance(e, PredictionToVelocity) for e in wrapped)
    assert [e.target for e in wrapped] == ["eps", "x0"] and wrapped[0].net.config()["size"] == "DiT-T/4"
    # the loaded expert's velocity is its network's prediction converted by the path
    x, t, y = torch.randn(2, 1, IMAGE, IMAGE), torch.tensor([0.3, 0.8]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(wrapped[0](x, t, y), path.velocity_from("eps", x, wrapped[0].net(x, t, y), t))
    for strategy, scale in (("full", 2.0), ("top1", 1.0)):
        ens, path, _ = load_ensemble(rd.root, strategy=strategy)
        out = sample(ens, path, (4, 1, IMAGE, IMAGE), y=torch.arange(4) % 3, steps=2, solver="heun", cfg_scale=scale)
        assert out.shape == (4, 1, IMAGE, IMAGE) and torch.isfinite(out).all()
    bare, meta = load_expert(rd.expert_weights(1), velocity=False)
    assert isinstance(bare, DiT) and meta["target"] == "eps"


def test_loader_names_the_files_of_experts_with_other_image_shapes(tmp_path):
    rd = make_run(tmp_path, K=2)
    save_expert(rd, 1, K=2, image=2 * IMAGE)
    with pytest.raises(
        ValueError,
        match=r"different shapes .*expert-00/expert.pt: 1 channel\(s\) x 8px.*expert-01/expert.pt: 1 "
        r"channel\(s\) x 16px.*router.pt: 1 channel\(s\) x 8px",
    ):
        load_ensemble(rd.root)
    save_expert(rd, 1, K=2, channels=3)
    with pytest.raises(ValueError, match=r"expert-01/expert.pt: 3 channel\(s\) x 8px"):
        load_ensemble(rd.root)


def test_loader_names_an_expert_file_with_an_unknown_target(tmp_path):
    rd = make_run(tmp_path, K=2)
    save_expert(rd, 1, K=2, target="score")
    with pytest.raises(ValueError, match=r"expert-01/expert.pt says its expert predicts target='score'"):
        load_ensemble(rd.root)


def test_loader_needs_a_router(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-router"):
        load_ensemble(tmp_path)


# ---- the sample stage -----------------------------------------------------------------------
@functools.cache
def _stage_settings():
    """The default settings at seed 7 (conf/sample/default.yaml as cfg.sample), composed once."""
    return settings(["seed=7", "redo=false"])


def stage_cfg(run_dir, **sample_overrides):
    """The default settings with ``run_dir`` and a few sampling settings changed."""
    fast = dict(device="cpu", steps=3, solver="heun", per_class=2, num_samples=2, batch_size=4)
    changes = {f"sample.{key}": value for key, value in {**fast, **sample_overrides}.items()}
    return changed(_stage_settings(), {"run_dir": str(run_dir), **changes})


def test_sample_stage_end_to_end_and_skip(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=2)
    write_json(rd.data_manifest, dict(num_samples=0, shards=[], class_names=["tee", "bag", "boot"]))
    record = stage.run(stage_cfg(rd.root))

    out = rd.samples
    for name in ("grid.png", "samples.npz", "usage.json", "usage.png", "record.json"):
        assert (out / name).exists(), name
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (8, IMAGE, IMAGE) and npz["images"].dtype == np.uint8
    assert npz["labels"][:6].tolist() == [0, 0, 1, 1, 2, 2] and int(npz["num_grid"]) == 6
    usage = json.loads((out / "usage.json").read_text())
    assert len(usage) == num_evaluations(3, "heun") == 5
    assert all(sum(r["counts"]) == 8 for r in usage)  # top1: every sample to exactly one expert
    assert usage[0]["t"] == pytest.approx(1.0)
    assert record["num_images"] == 8 and record["clustering_id"] == "abc" and record["settings"]["strategy"] == "top1"
    assert set(record["experts_used"]) <= {0, 1} and record["experts_used"]
    assert json.loads(rd.samples_record.read_text())["settings"] == record["settings"]

    # same settings: skipped (the loader is not even reached); new settings or redo: sampled again
    stamp = rd.samples_record.stat().st_mtime_ns
    rd.router_weights.unlink()
    assert stage.run(stage_cfg(rd.root)) == record
    assert rd.samples_record.stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="train-router"):
        stage.run(stage_cfg(rd.root, strategy="full"))


def test_sample_stage_is_deterministic_in_the_seed(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path / "a", K=2)
    stage.run(stage_cfg(rd.root, strategy="sample", solver="euler", num_samples=0))
    first = np.load(rd.samples / "samples.npz")["images"]
    cfg = changed(stage_cfg(rd.root, strategy="sample", solver="euler", num_samples=0), {"redo": True})
    stage.run(cfg)
    assert np.array_equal(first, np.load(rd.samples / "samples.npz")["images"])


def test_sample_config_composes(make_cfg):
    cfg = make_cfg("sample.strategy=topk", "sample.experts=[0,2]")
    assert cfg.sample.strategy == "topk" and list(cfg.sample.experts) == [0, 2]
    assert cfg.sample.seed == cfg.seed


def test_sample_stage_unconditional_models(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=3, num_classes=0)
    record = stage.run(stage_cfg(rd.root, strategy="topk", top_k=2, cfg_scale=2.0, num_samples=1))
    npz = np.load(rd.samples / "samples.npz")
    assert record["num_grid"] == 4 and npz["images"].shape[0] == 5 and (npz["labels"] == -1).all()
    usage = json.loads((rd.samples / "usage.json").read_text())
    assert all(sum(r["counts"]) == 2 * 5 for r in usage)  # top-2: two experts per sample
    assert record["settings"]["top_k"] == 2 and record["settings"]["experts"] is None


# ---- the grid's rows: capped by sample.grid_rows -----------------------------------------------
def _count_sampled(monkeypatch) -> list[int]:
    """The batch sizes the sample stage integrates, call by call (every image it draws passes here)."""
    from ddm.sampling import draw

    sizes = []

    def counting(model, path, shape, **kw):
        sizes.append(shape[0])
        return sample(model, path, shape, **kw)

    monkeypatch.setattr(draw, "sample", counting)
    return sizes


def test_a_thousand_class_grid_draws_at_most_grid_rows_rows(tmp_path, monkeypatch):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=2, num_classes=1000)
    sizes = _count_sampled(monkeypatch)
    grids = []
    monkeypatch.setattr(stage, "save_grid", lambda images, nrow, path, row_labels=None: grids.append(row_labels))
    cfg = stage_cfg(rd.root, solver="euler", steps=2, per_class=2, num_samples=3, batch_size=64)
    assert cfg.sample.grid_rows == 16  # conf/sample/default.yaml
    record = stage.run(cfg)

    spaced = [i * 1000 // 16 for i in range(16)]  # 0, 62, 125, ..., 937: the whole range of classes
    assert sum(sizes) == 16 * 2 + 3 == record["num_images"]  # not 1000 x 2 grid images first
    assert record["num_grid"] == 32 and record["grid_classes"] == spaced and record["settings"]["grid_rows"] == 16
    labels = np.load(rd.samples / "samples.npz")["labels"]
    assert labels[:32].tolist() == [c for c in spaced for _ in range(2)]
    assert grids == [[str(c) for c in spaced]]  # each row named by its own class

    # grid_rows is a sampling setting: another value samples again rather than reusing the record
    record = stage.run(stage_cfg(rd.root, solver="euler", steps=2, per_class=2, num_samples=3, grid_rows=4))
    assert record["num_grid"] == 8 and record["grid_classes"] == [0, 250, 500, 750] and sum(sizes) == 35 + 11


def test_grid_rows_leave_runs_with_few_classes_unchanged():
    from ddm.sampling.grid import grid_classes, plan_labels

    for rows in (16, 10, None):  # ten classes: every one, in order, as before grid_rows existed
        labels, num_grid = plan_labels(10, 3, 4, torch.Generator().manual_seed(0), rows)
        assert labels[:30].tolist() == [c for c in range(10) for _ in range(3)] and num_grid == 30
        assert grid_classes(10, rows) == list(range(10))
    assert grid_classes(10, 3) == [0, 3, 6]
    # the extra samples draw from every class whatever the grid shows, with the same draws as before
    capped, _ = plan_labels(1000, 2, 500, torch.Generator().manual_seed(0), 4)
    full, _ = plan_labels(1000, 2, 500, torch.Generator().manual_seed(0), None)
    assert torch.equal(capped[8:], full[2000:]) and capped[8:].max() > 900
    # unconditional: per_class x per_class, at most grid_rows rows high
    assert plan_labels(0, 3, 5, None, 16) == (None, 9) and plan_labels(0, 3, 5, None, 2) == (None, 6)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "many", True])
def test_a_bad_grid_rows_is_a_clear_error(bad):
    from ddm.sampling.draw import requested_settings

    with pytest.raises(BadInput, match=r"sample\.grid_rows"):  # refused by its type (2.5, ...) or by its range
        requested_settings(changed(settings(["seed=0"]).sample, {"grid_rows": bad}))


# ---- a lost island: sampling with the experts that exist -------------------------------------
def test_available_experts_sample_with_a_renormalised_router(tmp_path, caplog):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=4, experts=[0, 2])
    with pytest.raises(FileNotFoundError, match=r"experts \[1, 3\] are missing.*sample.experts=available"):
        load_ensemble(rd.root)
    with caplog.at_level("WARNING", logger="ddm"):
        ens, _, info = load_ensemble(rd.root, subset="available", strategy="full")
    assert info.experts == [0, 2] and info.missing_experts == [1, 3] and ens.active_ids == [0, 2]
    assert "experts [1, 3] are missing" in caplog.text
    selected, weights = ens.route(
        torch.randn(5, 1, IMAGE, IMAGE), torch.full((5,), 0.5), torch.zeros(5, dtype=torch.long)
    )
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))  # all the mass on the experts present

    record = stage.run(stage_cfg(rd.root, experts="available"))
    assert record["experts_loaded"] == [0, 2] and record["experts_missing"] == [1, 3]
    assert set(record["experts_used"]) <= {0, 2} and record["settings"]["experts"] == "available"
    usage = json.loads((rd.samples / "usage.json").read_text())
    assert all(r["counts"][1] == 0 and r["counts"][3] == 0 for r in usage)

    # The same settings again: done. Once the lost expert is back, `available` samples again with it.
    assert stage.run(stage_cfg(rd.root, experts="available")) == record
    save_expert(rd, 1, K=4)
    again = stage.run(stage_cfg(rd.root, experts="available"))
    assert again["experts_loaded"] == [0, 1, 2] and again["experts_missing"] == [3]


def test_available_needs_at_least_one_expert_and_a_known_word(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=2, experts=[])
    with pytest.raises(FileNotFoundError, match="no expert of the K=2"):
        load_ensemble(rd.root, subset="available")
    with pytest.raises(ValueError, match="sample.experts='some'"):
        stage.run(stage_cfg(rd.root, experts="some"))


def test_available_still_refuses_another_clustering(tmp_path):
    rd = make_run(tmp_path, K=3, experts=[0])
    save_expert(rd, 2, K=3, clustering_id="def")
    with pytest.raises(
        ValueError, match=r"expert 2 \(.*\) was trained on clustering def, but the run is clustering abc"
    ):
        load_ensemble(rd.root, subset="available")


def _loaded(**fields):
    """A ``LoadedModels`` of a small labelled run, with ``fields`` set."""
    from ddm.sampling.loaded import LoadedModels

    base = dict(num_experts=3, clustering_id="abc", flow={}, num_classes=10, image_size=8, in_channels=1)
    return LoadedModels(**{**base, **fields})


def test_guidance_is_refused_for_experts_with_an_untrained_null_label():
    from ddm.errors import BadInput
    from ddm.sampling.fit import check_guidance

    info = _loaded(num_classes=10, expert_label_dropout={0: 0.1, 1: 0.0, 2: None})
    with pytest.raises(BadInput, match=r"sample.cfg_scale=1.5 .*experts \[1\] .*label_dropout=0"):
        check_guidance(info, 1.5)
    check_guidance(info, 1.0)  # no guidance: nothing to refuse
    check_guidance(replace(info, num_classes=0), 1.5)  # unconditional: guidance is ignored anyway
    check_guidance(_loaded(num_classes=10, expert_label_dropout={0: 0.1, 2: None}), 3.0)  # None: an older file


def test_separate_guidance_routing_is_refused_for_a_router_with_an_untrained_null_label():
    from ddm.errors import BadInput
    from ddm.sampling.fit import check_guidance

    info = _loaded(num_classes=10, expert_label_dropout={0: 0.1}, router_label_dropout=0.0)
    with pytest.raises(BadInput, match=r"cfg_routing=separate .*router.label_dropout=0"):
        check_guidance(info, 1.5, cfg_routing="separate")
    check_guidance(info, 1.5)  # shared routing never routes the null input
    check_guidance(info, 1.0, cfg_routing="separate")  # no guidance, no null input
    check_guidance(replace(info, router_label_dropout=0.1), 1.5, cfg_routing="separate")
    check_guidance(replace(info, router_label_dropout=None), 1.5, cfg_routing="separate")  # an older file


def test_a_velocity_model_must_define_forward():
    class NoForward(VelocityModel):
        num_classes = 3

    with pytest.raises(TypeError, match="abstract"):
        NoForward()


# ---- threshold / nucleus and guidance routing through the stage --------------------------------
def test_sample_stage_nucleus_with_separately_routed_guidance(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=3)
    cfg = stage_cfg(
        rd.root, strategy="nucleus", top_p=0.8, cfg_routing="separate", cfg_scale=2.0, solver="euler", cfg_interval=None
    )
    record = stage.run(cfg)
    assert record["settings"]["top_p"] == 0.8 and record["settings"]["cfg_routing"] == "separate"
    assert record["settings"]["strategy"] == "nucleus" and 1 <= record["experts_per_sample"] <= 3
    usage = json.loads((rd.samples / "usage.json").read_text())
    total = record["num_images"]
    assert len(usage) == 3
    for r in usage:
        # each sample's conditional and null input ran on one to three experts each
        assert total <= sum(r["counts"]) <= 3 * total and total <= sum(r["uncond_counts"]) <= 3 * total
        assert sum(r["weights"]) == pytest.approx(1.0) and sum(r["uncond_weights"]) == pytest.approx(1.0)
    assert record["experts_per_sample"] == pytest.approx(sum(sum(r["counts"]) for r in usage) / (3 * total))
    # another top_p is another sampling: not skipped
    again = stage.run(stage_cfg(rd.root, strategy="nucleus", top_p=0.5, cfg_routing="separate", solver="euler"))
    assert again["settings"]["top_p"] == 0.5


@pytest.mark.parametrize(
    "override,key",
    [
        (dict(threshold=2.0), "sample.threshold"),
        (dict(top_p=0.0), "sample.top_p"),
        (dict(cfg_routing="x"), "cfg_routing"),
    ],
)
def test_sample_stage_refuses_bad_routing_options_before_loading(tmp_path, override, key):
    from ddm.errors import BadInput
    from ddm.stages import sample as stage

    with pytest.raises(BadInput, match=key):  # no run here: the check comes first
        stage.run(stage_cfg(tmp_path / "nothing", strategy="threshold", **override))


def test_samples_of_a_model_retrained_since_are_drawn_again(tmp_path):
    """The record names the weights its images came from: a retrained router (or expert) makes them stale."""
    from ddm.io import sha256_file
    from ddm.sampling.checkpoints import models_identity
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=2)
    write_json(rd.expert_record(0), dict(weights_sha256=sha256_file(rd.expert_weights(0))))
    first = stage.run(stage_cfg(rd.root))
    assert first["models"] == models_identity(rd) == {"expert-00": sha256_file(rd.expert_weights(0))}
    assert stage.run(stage_cfg(rd.root)) == first  # nothing changed: skipped

    save_router(rd, 2)  # the router retrained: other weights, and its record says so
    torch.manual_seed(7)
    state = torch.load(rd.router_weights, weights_only=False)
    state["state_dict"] = {k: v + 0.01 * torch.randn_like(v) for k, v in state["state_dict"].items()}
    torch.save(state, rd.router_weights)
    write_json(rd.router_record, dict(weights_sha256=sha256_file(rd.router_weights)))
    again = stage.run(stage_cfg(rd.root))
    assert again["models"]["router"] == sha256_file(rd.router_weights) and again["models"] != first["models"]
    assert stage.run(stage_cfg(rd.root)) == again
