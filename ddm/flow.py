"""The flow-matching probability path: one object for training, router noising and sampling.

Convention (used everywhere in ddm): ``t`` is a float in [0, 1]; ``t = 0`` is
data and ``t = 1`` is pure Gaussian noise::

    x_t = alpha(t) * x0 + sigma(t) * eps
    v(x_t, t) = d/dt x_t = alpha'(t) * x0 + sigma'(t) * eps      (the training target)

Sampling integrates ``dx/dt = v`` from ``t = 1`` down to ``t = 0``. Models
receive ``t`` exactly as defined here (no rescaling to integer steps); any
scaling for the timestep embedding happens inside the model.

An expert may regress another quantity than the velocity (``PREDICTIONS``):
the noise ``eps`` or the clean ``x0``. ``target`` gives the regression target
of each, and ``velocity_from`` turns a prediction at ``x_t`` back into the
velocity, exactly (it divides by alpha for ``eps`` and by sigma for ``x0``;
``ddm.models.prediction`` keeps t where those stay away from zero)::

    eps-prediction:  x0 = (x_t - sigma eps) / alpha,   v = alpha' x0 + sigma' eps
    x0-prediction:   eps = (x_t - alpha x0) / sigma,   v = alpha' x0 + sigma' eps
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddm.errors import BadInput
from ddm.settings import Flow


@dataclass(frozen=True)
class PathSample:
    """A clean sample moved along the path: what a training step needs."""

    x_t: torch.Tensor  # alpha(t) x0 + sigma(t) eps, shaped like x0
    t: torch.Tensor  # [B] times in [0, 1]
    eps: torch.Tensor  # the Gaussian noise, shaped like x0
    target: torch.Tensor  # the regression target: the conditional velocity d/dt x_t (or eps, or x0)


# What a network may be trained to predict at (x_t, t): the velocity, the noise, or the clean sample.
PREDICTIONS = ("velocity", "eps", "x0")


def check_prediction(kind: str, key: str = "expert.target") -> str:
    """``kind`` if it is one of ``PREDICTIONS``, else a ``BadInput`` naming ``key``."""
    if kind not in PREDICTIONS:
        raise BadInput(f"{key}={kind!r} is not one of {PREDICTIONS}")
    return kind


def velocity_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[B]``, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


class FlowPath:
    """A Gaussian probability path with velocity parameterisation.

    Args:
        schedule: ``linear`` (rectified flow: alpha = 1 - t, sigma = t) or
            ``cosine`` (alpha = cos(pi t / 2), sigma = sin(pi t / 2)).
        time_sampling: training-time distribution of t: ``uniform`` or
            ``logit_normal`` (Esser et al. 2024), which spends more steps at mid t.
        logit_mean, logit_std: parameters of the logit-normal distribution.
        t_eps: t is kept in [t_eps, 1 - t_eps] when sampled for training, so the
            router and the experts never see exactly degenerate inputs.
    """

    SCHEDULES = ("linear", "cosine")
    TIME_SAMPLINGS = ("uniform", "logit_normal")

    def __init__(
        self,
        schedule: str = "linear",
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        t_eps: float = 1e-5,
    ):
        if schedule not in self.SCHEDULES:
            raise BadInput(f"flow schedule={schedule!r} is not one of {self.SCHEDULES}")
        if time_sampling not in self.TIME_SAMPLINGS:
            raise BadInput(f"flow time_sampling={time_sampling!r} is not one of {self.TIME_SAMPLINGS}")
        self.schedule = schedule
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.t_eps = t_eps

    def __repr__(self) -> str:
        return f"FlowPath(schedule={self.schedule!r}, time_sampling={self.time_sampling!r})"

    def config(self) -> dict:
        return dict(
            schedule=self.schedule,
            time_sampling=self.time_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            t_eps=self.t_eps,
        )

    # ---- coefficients -------------------------------------------------------------
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t if self.schedule == "linear" else torch.cos(0.5 * math.pi * t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.schedule == "linear" else torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return torch.ones_like(t)
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    # ---- training -----------------------------------------------------------------
    def sample_t(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            z = torch.randn(n, device=device, generator=generator) * self.logit_std + self.logit_mean
            t = torch.sigmoid(z)
        return t.clamp(self.t_eps, 1.0 - self.t_eps)

    @staticmethod
    def _bc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sample t of shape [B] against x of shape [B, ...]."""
        return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = self._bc(t, x0)
        return self.alpha(tb) * x0 + self.sigma(tb) * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional velocity d/dt x_t: the regression target of every expert."""
        tb = self._bc(t, x0)
        return self.d_alpha(tb) * x0 + self.d_sigma(tb) * eps

    def target(self, kind: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of a network that predicts ``kind`` (one of ``PREDICTIONS``)."""
        if kind == "velocity":
            return self.velocity(x0, eps, t)
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        raise BadInput(f"prediction {kind!r} is not one of {PREDICTIONS}")

    def noised(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prediction: str = "velocity",
    ) -> PathSample:
        """A point of the path for each clean sample: one call for expert and router training.

        ``t`` and ``eps`` are drawn (from ``generator``) unless given; the evaluation
        gives both, so every model sees the same noisy inputs. ``prediction``: what
        ``target`` holds (``PREDICTIONS``; the velocity by default). The draws are
        the same whatever it is.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], device=x0.device, generator=generator)
        if eps is None:
            eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return PathSample(x_t=self.interpolate(x0, eps, t), t=t, eps=eps, target=self.target(prediction, x0, eps, t))

    def loss(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prediction: str = "velocity",
    ) -> torch.Tensor:
        """The flow-matching loss of ``model(x_t, t, y)`` on clean ``x0``, per sample ``[B]``.

        The one loss of ddm: experts train on its mean and the evaluation reports it
        on held-out images. It is the mean squared error to the conditional velocity
        over every element of a sample, computed in float32 whatever the model's dtype.
        With ``prediction`` ``eps`` or ``x0`` the model predicts that instead and the
        error is to it (the training loss of such an expert; the evaluation converts
        every expert to the velocity first and measures the velocity's error).
        """
        return self.loss_at(model, self.noised(x0, t=t, eps=eps, generator=generator, prediction=prediction), y)

    @staticmethod
    def loss_at(model, point: PathSample, y: torch.Tensor | None = None) -> torch.Tensor:
        """The same loss at a point already drawn: training draws (t, eps) before it drops labels."""
        return velocity_mse(model(point.x_t, point.t, y), point.target)

    # ---- conversions between predictions ------------------------------------------
    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        tb = self._bc(t, like)
        return self.alpha(tb), self.sigma(tb), self.d_alpha(tb), self.d_sigma(tb)

    def x0_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert (x_t, v) -> x0, using alpha, sigma, alpha', sigma' at t.

        Finite at every t: the determinant alpha sigma' - sigma alpha' is 1 on the
        linear path and pi / 2 on the cosine one.
        """
        a, s, da, ds = self._coefficients(t, x_t)
        return (ds * x_t - s * v) / (ds * a - s * da)

    def eps_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert (x_t, v) -> eps (finite at every t, as ``x0_from_velocity``)."""
        a, s, da, ds = self._coefficients(t, x_t)
        return (a * v - da * x_t) / (ds * a - s * da)

    def velocity_from(self, kind: str, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity at ``(x_t, t)`` of a network that predicted ``prediction`` of kind ``kind``, exactly.

        ``eps`` divides by alpha (0 at t = 1), ``x0`` by sigma (0 at t = 0): the
        result is not finite there. ``ddm.models.prediction.PredictionToVelocity``
        evaluates such networks at t kept in [t_eps, 1 - t_eps] instead.
        """
        if kind == "velocity":
            return prediction
        a, s, da, ds = self._coefficients(t, x_t)
        if kind == "eps":
            x0 = (x_t - s * prediction) / a
            return da * x0 + ds * prediction
        if kind == "x0":
            eps = (x_t - a * prediction) / s
            return da * prediction + ds * eps
        raise BadInput(f"prediction {kind!r} is not one of {PREDICTIONS}")

    def prediction_from_velocity(self, kind: str, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``velocity_from``: what a network of kind ``kind`` predicts where the velocity is ``v``."""
        if kind == "velocity":
            return v
        if kind == "eps":
            return self.eps_from_velocity(x_t, v, t)
        if kind == "x0":
            return self.x0_from_velocity(x_t, v, t)
        raise BadInput(f"prediction {kind!r} is not one of {PREDICTIONS}")

    # ---- sampling -----------------------------------------------------------------
    def prior(self, shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """x at t = 1: standard Gaussian noise."""
        return torch.randn(shape, device=device, generator=generator)

    def time_grid(self, num_steps: int, device=None) -> torch.Tensor:
        """Integration times from 1 (noise) to 0 (data), ``num_steps + 1`` points."""
        if num_steps < 1:
            raise BadInput(f"sample.steps={num_steps} must be at least 1")
        return torch.linspace(1.0, 0.0, num_steps + 1, device=device)


def flow_path_from_config(cfg: Flow | dict | None) -> FlowPath:
    """Build the path from the ``flow`` settings group or a saved dict."""
    cfg = cfg.to_dict() if isinstance(cfg, Flow) else dict(cfg or {})
    return FlowPath(
        **{k: cfg[k] for k in ("schedule", "time_sampling", "logit_mean", "logit_std", "t_eps") if k in cfg}
    )
