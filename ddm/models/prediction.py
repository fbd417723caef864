"""Experts that predict the noise or the clean sample, seen by the ensemble and the solvers as velocity models.

An expert may train on another target than the path's velocity (``expert.target``,
``ddm.flow.PREDICTIONS``): ``eps`` (as DDPM) or ``x0``. ``PredictionToVelocity``
wraps such a network and presents ``model(x, t, y) -> v``, so the ensemble, the
solvers, the FLOP counter and the held-out FM loss see one kind of model. The
conversion is ``FlowPath.velocity_from``, exact for x_t = alpha x0 + sigma eps::

    eps-prediction:  x0 = (x_t - sigma eps) / alpha,   v = alpha' x0 + sigma' eps
    x0-prediction:   eps = (x_t - alpha x0) / sigma,   v = alpha' x0 + sigma' eps

**Guard.** alpha is 0 at t = 1 and sigma is 0 at t = 0, so the wrapper evaluates
the network *and* the conversion at ``t_c = clamp(t, t_eps, 1 - t_eps)``, by
default the expert's own training range (``flow.t_eps`` of its job: training
never draws t outside it). Inside the range the velocity is exact; outside, it is
the exact conversion at the nearest trained time: finite at t = 0 and t = 1, and,
for a perfect expert, the true velocity at ``t_c`` (off by O(t_eps), since v is
continuous in t). What no guard removes: at t near 1 an eps-network's error is
multiplied by about alpha'/alpha (1 / t_eps at t = 1 on the linear path: 1e5 at
the default t_eps, so an imperfect eps expert's first solver step is far off),
and at t near 0 an x0-network's by sigma'/sigma (the solvers never evaluate
t = 0; the last evaluation is at t = 1 / steps). A larger ``flow.t_eps`` for an
eps expert's job (e.g. 5e-3, about DDPM's smallest alpha, 0.0064) trains and
guards it on a narrower range, and bounds that factor by 1 / t_eps.

**Guidance.** The conversion is affine in the prediction, ``v = A(t) x_t + B(t) p``,
with the same ``x_t`` and ``t`` for the conditional and unconditional halves, so

    v(p_u + s (p_c - p_u)) = v_u + s (v_c - v_u)

exactly: guiding the predictions and converting once equals guiding the
velocities. ``forward_with_cfg`` guides the predictions (one conversion), in the
network's own doubled batch.
"""

from __future__ import annotations

import torch

from ddm.errors import BadInput
from ddm.flow import PREDICTIONS, FlowPath, check_prediction
from ddm.models.velocity import VelocityModel, guided_velocity, num_classes_of


class PredictionToVelocity(VelocityModel):
    """A network trained to predict ``target`` (``eps`` or ``x0``), as a velocity model.

    Args:
        net: ``net(x, t, y)`` -> the prediction, shaped like ``x``.
        target: what ``net`` predicts: ``eps`` or ``x0`` (``velocity`` needs no wrapper,
            see ``as_velocity_model``).
        path: the flow path ``net`` was trained on.
        t_eps: the guard: t is kept in [t_eps, 1 - t_eps] (default ``path.t_eps``, the
            training range).
    """

    def __init__(self, net: torch.nn.Module, target: str, path: FlowPath, t_eps: float | None = None):
        super().__init__()
        self.net = net
        self.target = check_prediction(target)
        self.path = path
        self.t_eps = float(path.t_eps if t_eps is None else t_eps)
        if not 0.0 < self.t_eps < 0.5:
            raise BadInput(f"the guard t_eps={self.t_eps} must be in (0, 0.5)")

    @property
    def num_classes(self):
        return num_classes_of(self.net)

    @property
    def text_dim(self) -> int:
        return int(getattr(self.net, "text_dim", 0) or 0)

    def config(self) -> dict:
        """The wrapped network's constructor arguments (what an expert.pt records)."""
        return self.net.config()

    def extra_repr(self) -> str:
        return f"target={self.target!r}, schedule={self.path.schedule!r}, t_eps={self.t_eps:g}"

    def guarded_t(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` moved into [t_eps, 1 - t_eps]: where the network and the conversion are evaluated."""
        return t.clamp(self.t_eps, 1.0 - self.t_eps)

    def to_velocity(self, x: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity of ``prediction`` at ``(x, t)`` (``t`` already guarded), in at least float32."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, prediction.dtype), torch.float32)
        return self.path.velocity_from(self.target, x.to(dtype), prediction.to(dtype), t.to(dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        t = self.guarded_t(t)
        return self.to_velocity(x, self.net(x, t, y), t)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y, scale: float) -> torch.Tensor:
        """Guidance of the predictions, converted once (equal to guiding the velocities: see the module)."""
        t = self.guarded_t(t)
        return self.to_velocity(x, guided_velocity(self.net, x, t, y, scale), t)


def as_velocity_model(net: torch.nn.Module, target: str | None, path: FlowPath, t_eps: float | None = None):
    """``net`` itself when it predicts the velocity (``target`` None or ``velocity``), else wrapped."""
    target = check_prediction(target or "velocity")
    if target == "velocity":
        return net
    return PredictionToVelocity(net, target, path, t_eps)


def network_of(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``PredictionToVelocity`` (the model itself otherwise)."""
    return model.net if isinstance(model, PredictionToVelocity) else model


def target_of(model: torch.nn.Module) -> str:
    """What ``model``'s network predicts: ``velocity`` unless it is a ``PredictionToVelocity``."""
    return model.target if isinstance(model, PredictionToVelocity) else "velocity"


__all__ = ["PREDICTIONS", "PredictionToVelocity", "as_velocity_model", "network_of", "target_of"]
