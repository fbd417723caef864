"""Choosing a torch device from a config string."""

from __future__ import annotations

import torch

from ddm.errors import BadInput


def module_device(model) -> torch.device:
    """Where a module's parameters live; the CPU for parameter-free modules and plain functions."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def resolve_device(name: str | None, key: str = "device") -> torch.device:
    """``auto`` (or None): the GPU when one is visible, else the CPU; otherwise the device named.

    ``key`` names the config option in the error for a CUDA device that is not there.
    """
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"{key}={name} but no CUDA device is visible: use {key}=cpu or {key}=auto")
    return torch.device(name)
