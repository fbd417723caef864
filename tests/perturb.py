"""Give a fresh DiT a real function, and compare its bf16 and fp32 sampling; on the CPU and on a GPU alike.

A fresh DiT outputs exactly zero (adaLN-Zero: every block's gates and the final layer start at
zero), so sampling with it returns the prior noise unchanged under any precision: a bf16-vs-fp32
comparison of a fresh network can never see a difference. ``perturb_weights`` moves every
parameter off its initial value, so the comparison measures something.
"""

from __future__ import annotations

import torch

from ddm.flow import FlowPath
from ddm.sampling.solvers import sample


def perturb_weights(net: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Add ``std`` x N(0, 1) noise to every parameter of ``net`` in place; return ``net``.

    The noise is drawn on the CPU from its own generator (the global RNG is left alone), parameter by
    parameter in ``named_parameters`` order, then moved to each parameter's device: the same seed
    perturbs a network identically on any device. 0.02 is the scale of DiT's own initialisation:
    the output becomes O(0.1-1) without the activations growing through the blocks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_((std * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return net


def bf16_and_fp32_samples(
    net: torch.nn.Module, shape: tuple, num_classes: int, device: str, steps: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``{"noise", "fp32", "bf16"}``: the prior noise, and what Euler sampling makes of it in fp32 and under
    bf16 autocast, from the same seed (labels ``0, 1, ...`` modulo ``num_classes``)."""
    y = torch.arange(shape[0], device=device) % num_classes
    path = FlowPath()
    out = dict(noise=path.prior(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device))
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(seed)  # CPU noise: the same start on any device
        out[name] = sample(net, path, shape, y=y, steps=steps, generator=g, device=device, autocast=dtype)
    return out


def check_bf16_close_to_fp32(runs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Assert bf16 sampling differs from fp32 (autocast acted) by a small fraction of how far sampling moved
    the noise (the network did something); return ``(err, moved)``, both max-abs."""
    assert runs["bf16"].dtype == runs["fp32"].dtype == torch.float32  # the solver's state stays fp32
    moved = (runs["fp32"] - runs["noise"]).abs().max().item()
    err = (runs["bf16"] - runs["fp32"]).abs().max().item()
    assert moved > 0.1, f"sampling left the noise almost unchanged (moved {moved}): is the network still fresh?"
    # bf16 keeps 8 bits of mantissa: about 0.4% relative error per op; measured 0.2-0.5% of `moved` on CPU
    assert 0 < err < 0.05 * moved, (err, moved)
    return err, moved
