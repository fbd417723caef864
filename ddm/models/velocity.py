"""The interfaces every sampler and the ensemble are written against.

A **velocity model** is anything a solver integrates: one expert, a monolith,
or the ``Ensemble`` of experts and router::

    model(x, t, y) -> v          x [B, C, H, W]; t [B] floats in [0, 1] (1 = noise);
                                 y [B] labels in [0, num_classes), or num_classes for
                                 "no label" (the guidance null row), or None
    model.num_classes            0 or None: unconditional
    model.forward_with_cfg(x, t, y, scale)   classifier-free guidance

A **router** gives ``r(x, t, y) -> [B, K]`` logits of p(k | x_t, t, y) and says
its ``num_outputs`` (K).

``VelocityModel`` states the first as a base class whose ``forward_with_cfg``
defaults to the doubled batch; a model with a cheaper guidance (the ensemble
routes once for both halves) overrides it. ``guided_velocity`` is the one place
that decides how a model is guided. Plain modules and analytic fields (tests)
work too: without ``forward_with_cfg`` they are guided through the doubled
batch, which needs their ``num_classes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from ddm.errors import BadInput
from ddm.models.conditioning import TextCondition, cat_conditions


class VelocityModel(nn.Module, ABC):
    """Base class of every model with the velocity interface (see the module docstring).

    Abstract: a subclass that does not define ``forward`` cannot be instantiated.
    """

    num_classes: int | None = None

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity ``v(x, t, y)``, shaped like ``x``."""

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond), in one doubled batch."""
        return guided(self, x, t, y, scale)


@runtime_checkable
class Router(Protocol):
    """``r(x, t, y) -> [B, K]`` logits of the cluster posterior, with ``num_outputs = K``."""

    num_outputs: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


def num_classes_of(model) -> int | None:
    """A model's label count (None when it does not say: an analytic field)."""
    return getattr(model, "num_classes", None)


def guided(model, x, t, y, scale: float):
    """CFG for any ``model(x, t, y)`` whose null label is ``model.num_classes``: one doubled batch.

    For text (``y`` a ``TextCondition``) the unconditional half is the same captions flagged null.
    """
    if scale == 1.0 or y is None:
        return model(x, t, y)
    if isinstance(y, TextCondition):
        v = model(torch.cat([x, x]), torch.cat([t, t]), cat_conditions([y, y.as_null()]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)
    num_classes = num_classes_of(model)
    if not num_classes:
        raise BadInput(
            f"classifier-free guidance (scale {scale}) needs a conditional model: "
            f"{type(model).__name__} has num_classes={num_classes!r}; use cfg_scale=1"
        )
    null = torch.full_like(y, num_classes)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(model, x, t, y, scale: float | None):
    """The velocity of ``model`` at (x, t, y), guided with ``scale`` (None or 1: no guidance)."""
    if scale is None or scale == 1.0 or y is None:
        return model(x, t, y)
    if isinstance(model, VelocityModel):
        return model.forward_with_cfg(x, t, y, scale)
    return guided(model, x, t, y, scale)


def check_guidable(model, scale: float) -> None:
    """Fail before sampling when ``model`` cannot be guided at ``scale``."""
    if scale != 1.0 and not isinstance(model, VelocityModel) and num_classes_of(model) is None:
        raise BadInput(
            f"sample.cfg_scale={scale} needs a VelocityModel or a model with num_classes "
            f"(its null label); {type(model).__name__} has neither: use cfg_scale=1"
        )
