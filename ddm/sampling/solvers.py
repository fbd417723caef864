"""ODE solvers for the probability-flow ODE ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data).

One sampler for every velocity model: a single DiT, an ``Ensemble`` of experts,
or an analytic field in a test. The model is called as ``model(x, t, y)`` with
``t`` a ``[B]`` float tensor on the path's own time scale (no rescaling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.models.velocity import VelocityModel, check_guidable, guided_velocity

SOLVERS = ("euler", "heun")


def check_cfg_interval(interval, key: str = "sample.cfg_interval") -> tuple[float, float] | None:
    """``None`` or ``(lo, hi)`` with ``0 <= lo < hi <= 1``: the t (1 = noise) where guidance is applied."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise BadInput(f"{key}={interval!r} must be null or two numbers [lo, hi] with 0 <= lo < hi <= 1") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise BadInput(f"{key}=[{lo}, {hi}] must have 0 <= lo < hi <= 1 (t: 1 is noise, 0 is data)")
    return lo, hi


def evaluation_times(path: FlowPath, steps: int, solver: str) -> list[float]:
    """The t of every model call ``sample`` makes, in order (Heun: each step's start and end but the last)."""
    grid = path.time_grid(steps).tolist()
    times = []
    for t, t_next in zip(grid[:-1], grid[1:]):
        times.append(t)
        if solver == "heun" and t_next != 0.0:
            times.append(t_next)
    return times


def guided_evaluations(path: FlowPath, steps: int, solver: str, cfg_interval=None) -> int:
    """How many of ``sample``'s model calls apply guidance (all of them without an interval)."""
    interval = check_cfg_interval(cfg_interval)
    times = evaluation_times(path, steps, solver)
    if interval is None:
        return len(times)
    return sum(1 for t in times if in_interval(t, interval))


def in_interval(t: float, interval: tuple[float, float] | None) -> bool:
    return interval is None or interval[0] <= t <= interval[1]


def velocity_fn(model, cfg_scale: float = 1.0) -> Callable:
    """``f(x, t, y) -> v`` for a model, with classifier-free guidance when asked for (see ``guided_velocity``)."""
    if cfg_scale == 1.0:
        return model
    check_guidable(model, cfg_scale)
    return lambda x, t, y: guided_velocity(model, x, t, y, cfg_scale)


def sample(
    model: VelocityModel,
    path: FlowPath,
    shape,
    y: torch.Tensor | None = None,
    steps: int = 20,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    device=None,
    x_init: torch.Tensor | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = v`` over ``path.time_grid(steps)`` and return x at t = 0.

    Args:
        model: any ``model(x, t, y) -> v`` (a DiT, an Ensemble, an analytic field).
        path: the flow path the model was trained on (gives the prior and the time grid).
        shape: shape of the batch, e.g. ``(B, C, H, W)``; ignored when ``x_init`` is given.
        y: labels ``[B]`` or None.
        steps: number of solver steps (grid intervals).
        solver: ``euler`` (1 evaluation per step) or ``heun`` (2nd order, trapezoid
            rule; 2 evaluations per step except the last, see below).
        cfg_scale: classifier-free guidance scale; 1 disables guidance.
        cfg_interval: ``(lo, hi)``: guide only the calls at ``lo <= t <= hi`` (the guidance interval of
            Kynkaanniemi et al. 2024: guidance at high noise costs diversity, at low noise it does
            little); the other calls are the conditional model alone, at the cost of one unguided call.
            None: every call is guided.
        generator: draws the prior noise; noise is drawn on the generator's device and
            moved to ``device``, so one seed gives the same samples on CPU and GPU.
        x_init: start from this x at t = 1 instead of drawing from the prior.
        dtype: dtype of x (default: that of ``x_init``, else float32).
        autocast: run the model calls under autocast to this dtype (``torch.bfloat16`` on a
            GPU); x, t and the update stay in ``dtype``, so the ODE accumulates in fp32.

    Heun's last step, the one that ends at t = 0, is an Euler step (as in the EDM
    sampler): the velocity at exactly t = 0 is outside the trained range
    [t_eps, 1 - t_eps] and is ill-defined for data on a low-dimensional set (for
    one data point it divides by t). Global error stays second order, since one
    Euler step adds only O(h^2). Heun thus makes ``2 * steps - 1`` evaluations.
    """
    if solver not in SOLVERS:
        raise BadInput(f"sample.solver={solver!r} is not one of {SOLVERS}")
    x = _initial(path, shape, x_init, generator, device, dtype)
    if y is not None:
        y = y.to(x.device)
    f = velocity_fn(model, cfg_scale)
    interval = check_cfg_interval(cfg_interval)
    grid = path.time_grid(steps).tolist()  # host floats: no device sync per step
    intervals = zip(grid[:-1], grid[1:])
    if progress:
        from tqdm.auto import tqdm

        intervals = tqdm(list(intervals), desc=f"sampling ({solver})")

    def v_at(x, t):
        g = f if in_interval(t, interval) else model
        t = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            v = g(x, t, y)
        return v.to(x.dtype)

    with torch.no_grad():
        for t, t_next in intervals:
            h = t_next - t  # negative: integrating from noise to data
            v = v_at(x, t)
            x_euler = x + h * v
            if solver == "euler" or t_next == 0.0:
                x = x_euler
            else:
                x = x + 0.5 * h * (v + v_at(x_euler, t_next))
    return x


def num_evaluations(steps: int, solver: str) -> int:
    """Model calls made by ``sample`` for one batch (what an Ensemble's usage log holds)."""
    return steps if solver == "euler" else 2 * steps - 1


def _initial(path, shape, x_init, generator, device, dtype):
    if x_init is not None:
        x = x_init.to(device) if device is not None else x_init
        return x.to(dtype) if dtype is not None else x.clone()
    noise_device = generator.device if generator is not None else device
    x = path.prior(tuple(shape), device=noise_device, generator=generator)
    return x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)
