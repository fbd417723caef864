"""Sampling: ODE solvers for any velocity model, and loading a run's experts and router::

from ddm.sampling import load_ensemble, sample
ensemble, path, info = load_ensemble("runs/demo", strategy="top1")
labels = torch.arange(16) % info.num_classes
x0 = sample(ensemble, path, (16, 1, 28, 28), y=labels, steps=20, solver="heun", cfg_scale=1.5)
"""

from ddm.sampling.checkpoints import load_expert, load_router
from ddm.sampling.ensemble_loading import load_ensemble
from ddm.sampling.solvers import SOLVERS, num_evaluations, sample, velocity_fn

__all__ = ["SOLVERS", "load_ensemble", "load_expert", "load_router", "num_evaluations", "sample", "velocity_fn"]
