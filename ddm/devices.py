"""Choosing a torch device, and the precision models run in on it, from config strings; the GPUs this
process may use."""

from __future__ import annotations

import os

import torch

from ddm.errors import BadInput


def module_device(model) -> torch.device:
    """Where a module's parameters live; the CPU for parameter-free modules and plain functions."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def to_device(x, device):
    """A host tensor -> ``device``, without a sync on CUDA: staged through pinned memory, copied asynchronously.

    A copy from pageable host memory waits for the device's stream first, so a loop of plain ``.to("cuda")``
    stalls the GPU once per batch. The pinned block is kept by torch's caching host allocator until the copy has
    finished. Anything else with a ``to`` (a ``TextCondition``) is moved by it.
    """
    device = torch.device(device)
    if isinstance(x, torch.Tensor) and device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


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


PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(name: str | None, device: torch.device, key: str = "precision") -> torch.dtype | None:
    """The dtype model calls are autocast to, or None for full fp32.

    ``auto``: bf16 on a CUDA device that supports it (tensor cores; the
    solver's state stays fp32), fp32 elsewhere (CPU bf16 matmuls are slow on
    most CPUs). ``bf16`` is refused on a device without bf16 support.
    """
    name = str(name or "auto")
    if name not in PRECISIONS:
        raise BadInput(f"{key}={name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise BadInput(f"{key}=bf16 but {torch.cuda.get_device_name(device)} has no bf16: use {key}=fp32")
    return torch.bfloat16


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (what is left outside autocast)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs).

    A child given a subset of these names sees exactly those GPUs: the names are not renumbered
    for it. When the variable is unset, every GPU torch sees, by index.
    """
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    visible = []
    for name in (n.strip() for n in names.split(",")):
        if not name or name.startswith("-"):  # CUDA stops at the first invalid entry ("-1" hides all)
            break
        visible.append(name)
    return visible
