"""Experts that predict eps or x0: FlowPath's exact conversions, the guards at t = 0 and 1, guidance, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ddm.errors import BadInput
from ddm.flow import PREDICTIONS, FlowPath
from ddm.models.dit import DiT
from ddm.models.prediction import PredictionToVelocity, as_velocity_model, network_of, target_of
from ddm.models.velocity import guided

SCHEDULES = ("linear", "cosine")
# inside (0, 1), close to both ends too: the conversions are exact wherever alpha and sigma are not 0
INNER_T = [1e-4, 1e-3, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1 - 1e-4]


def _point(schedule, n=64, seed=0):
    """Clean x0, noise eps, times t, and the path's x_t and velocity v there, in float64."""
    g = torch.Generator().manual_seed(seed)
    path = FlowPath(schedule)
    x0 = torch.randn(n, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor(INNER_T, dtype=torch.float64).repeat(n // len(INNER_T) + 1)[:n]
    return path, x0, eps, t, path.interpolate(x0, eps, t), path.velocity(x0, eps, t)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exact_eps_and_x0_give_the_exact_velocity(schedule):
    path, x0, eps, t, x_t, v = _point(schedule)
    torch.testing.assert_close(path.velocity_from("eps", x_t, eps, t), v, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.velocity_from("x0", x_t, x0, t), v, rtol=0, atol=1e-6)
    assert torch.equal(path.velocity_from("velocity", x_t, v, t), v)
    # and by hand, for the linear path: v = eps - x0
    if schedule == "linear":
        torch.testing.assert_close(v, eps - x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_velocity_gives_back_the_exact_eps_and_x0(schedule):
    path, x0, eps, t, x_t, v = _point(schedule, seed=1)
    torch.testing.assert_close(path.prediction_from_velocity("eps", x_t, v, t), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.prediction_from_velocity("x0", x_t, v, t), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.eps_from_velocity(x_t, v, t), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(path.x0_from_velocity(x_t, v, t), x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_round_trips(schedule, kind):
    """prediction -> velocity -> prediction and velocity -> prediction -> velocity, for arbitrary values."""
    path, _, _, t, x_t, _ = _point(schedule, seed=2)
    p = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    there = path.velocity_from(kind, x_t, p, t)
    torch.testing.assert_close(path.prediction_from_velocity(kind, x_t, there, t), p, rtol=0, atol=1e-6)
    back = path.prediction_from_velocity(kind, x_t, p, t)  # p read as a velocity
    torch.testing.assert_close(path.velocity_from(kind, x_t, back, t), p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_training_targets_share_the_draws(schedule):
    path = FlowPath(schedule)
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    points = {k: path.noised(x0, generator=torch.Generator().manual_seed(7), prediction=k) for k in PREDICTIONS}
    plain = path.noised(x0, generator=torch.Generator().manual_seed(7))
    for p in points.values():  # the same t, eps and x_t whatever the target
        assert torch.equal(p.t, plain.t) and torch.equal(p.eps, plain.eps) and torch.equal(p.x_t, plain.x_t)
    assert torch.equal(points["velocity"].target, plain.target)
    assert torch.equal(plain.target, path.velocity(x0, plain.eps, plain.t))
    assert torch.equal(points["eps"].target, plain.eps) and torch.equal(points["x0"].target, x0)
    with pytest.raises(BadInput, match=r"prediction 'score' is not one of"):
        path.noised(x0, prediction="score")


def test_velocity_loss_is_the_loss_of_before():
    """The default (velocity) loss is, bit for bit, the MSE to alpha' x0 + sigma' eps at the same draws."""
    path = FlowPath("linear", time_sampling="logit_normal")
    torch.manual_seed(0)
    net = DiT("DiT-N/2", image_size=4, in_channels=1, num_classes=3)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    x0, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    got = path.loss(net, x0, y, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = path.sample_t(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    want = (net(x_t, t, y).float() - (eps - x0)).pow(2).flatten(1).mean(1)
    assert torch.equal(got, want)
    assert torch.equal(path.loss(net, x0, y, generator=torch.Generator().manual_seed(5), prediction="velocity"), got)


class SinglePoint(nn.Module):
    """The exact prediction of each kind when the data is one point c: E[x0 | x_t] = c."""

    num_classes = 0

    def __init__(self, path: FlowPath, c: torch.Tensor, kind: str):
        super().__init__()
        self.path, self.kind = path, kind
        self.register_buffer("c", c)

    def forward(self, x, t, y=None):
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        a, s = self.path.alpha(tb), self.path.sigma(tb)
        eps = (x - a * self.c) / s
        return {
            "x0": self.c.expand_as(x),
            "eps": eps,
            "velocity": self.path.d_alpha(tb) * self.c + self.path.d_sigma(tb) * eps,
        }[self.kind]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_the_wrapper_is_exact_inside_the_trained_range(schedule, kind):
    path = FlowPath(schedule)
    c = torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(1, 1, 3, 3)
    wrapped = PredictionToVelocity(SinglePoint(path, c, kind), kind, path)
    exact = SinglePoint(path, c, "velocity")
    x = torch.randn(len(INNER_T), 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(INNER_T, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x, t), exact(x, t), rtol=1e-9, atol=1e-9)


class Fixed(nn.Module):
    """A network that answers ``out`` whatever it is asked: an arbitrary (untrained) prediction."""

    num_classes = 0

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out)

    def forward(self, x, t, y=None):
        return self.out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_the_guard_keeps_t_0_and_1_finite(schedule, kind):
    """Unguarded, eps divides by alpha(1) = 0 and x0 by sigma(0) = 0; the wrapper answers at the nearest trained t."""
    path = FlowPath(schedule)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ends = torch.tensor([0.0, 0.0, 1.0, 1.0])
    arbitrary = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    raw = path.velocity_from(kind, x, arbitrary, ends)
    # the guard is needed: a division by 0 (float32's cos(pi / 2) is -4e-8, not 0: a division by almost 0)
    end = raw[2 if kind == "eps" else 0]
    assert not torch.isfinite(end).all() or end.abs().max() > 1e6

    torch.manual_seed(0)
    net = DiT("DiT-N/2", image_size=4, in_channels=1, num_classes=0)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    for model in (PredictionToVelocity(net, kind, path), PredictionToVelocity(Fixed(arbitrary), kind, path)):
        assert torch.isfinite(model(x, ends)).all()
        assert torch.isfinite(model.forward_with_cfg(x, ends, None, 2.0)).all()
    assert PredictionToVelocity(net, kind, path).guarded_t(ends).tolist() == pytest.approx(
        [path.t_eps, path.t_eps, 1 - path.t_eps, 1 - path.t_eps]
    )
    # a perfect expert answers with the exact velocity at the guarded t: off by O(t_eps) from the one at t
    c = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    wrapped = PredictionToVelocity(SinglePoint(path, c, kind), kind, path)
    exact = SinglePoint(path, c, "velocity")
    xd, ends = x.double(), ends.double()
    torch.testing.assert_close(wrapped(xd, ends), exact(xd, ends.clamp(path.t_eps, 1 - path.t_eps)))
    if kind == "eps":  # at t = 1 the velocity of one point is finite: c' is reached within O(t_eps)
        torch.testing.assert_close(wrapped(xd, ends)[2:], exact(xd, ends)[2:], rtol=0, atol=1e-3)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_guiding_predictions_equals_guiding_velocities(schedule, kind):
    """The conversion is affine in the prediction with the same x_t for both halves: both guidances agree."""
    path = FlowPath(schedule)
    torch.manual_seed(0)
    net = DiT("DiT-N/2", image_size=4, in_channels=1, num_classes=3).double()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    model = PredictionToVelocity(net, kind, path)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.95, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for scale in (1.0, 1.5, 4.0):
        by_predictions = model.forward_with_cfg(x, t, y, scale)
        by_velocities = guided(model, x, t, y, scale)  # the doubled batch of converted velocities
        torch.testing.assert_close(by_predictions, by_velocities, rtol=1e-10, atol=1e-10)
    # and it is guidance: the guided velocity differs from the conditional one
    assert not torch.allclose(model.forward_with_cfg(x, t, y, 3.0), model(x, t, y))


def test_as_velocity_model_wraps_only_what_needs_it():
    path = FlowPath()
    net = DiT("DiT-N/2", image_size=4, in_channels=1, num_classes=3)
    assert as_velocity_model(net, "velocity", path) is net and as_velocity_model(net, None, path) is net
    wrapped = as_velocity_model(net, "eps", path)
    assert isinstance(wrapped, PredictionToVelocity) and network_of(wrapped) is net and target_of(wrapped) == "eps"
    assert wrapped.num_classes == 3 and wrapped.config() == net.config() and target_of(net) == "velocity"
    with pytest.raises(BadInput, match=r"expert.target='noise' is not one of \('velocity', 'eps', 'x0'\)"):
        as_velocity_model(net, "noise", path)
    assert PredictionToVelocity(net, "x0", FlowPath(t_eps=0.01)).t_eps == 0.01  # the expert's own training range
