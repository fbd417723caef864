"""The premise of the GPU check ``test_bf16_sampling_is_close_to_fp32``, and the same comparison on the CPU.

A fresh DiT outputs exactly zero (adaLN-Zero), so comparing its bf16 and fp32 samples proves nothing;
``tests.perturb.perturb_weights`` gives it a real function first. torch's CPU autocast supports bfloat16,
so the comparison the GPU test makes runs here too, on a small network.
"""

from __future__ import annotations

import pytest
import torch

from ddm.models.dit import DiT
from tests.perturb import bf16_and_fp32_samples, check_bf16_close_to_fp32, perturb_weights

SHAPE = (8, 4, 16, 16)  # the GPU test's 4-channel latents, smaller: DiT-N/2 on 16 px takes a tenth of a second


def _fresh(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT("DiT-N/2", SHAPE[2], SHAPE[1], 10).eval()


def _output(net: DiT) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return net(x, torch.full((SHAPE[0],), 0.5), torch.arange(SHAPE[0]) % 10)


def test_a_fresh_dit_outputs_exactly_zero_and_a_perturbed_one_does_not():
    net = _fresh()
    assert torch.equal(_output(net), torch.zeros(SHAPE))
    out = _output(perturb_weights(net))
    assert out.abs().max() > 0.1 and out.std() > 0.01


def test_perturbation_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = perturb_weights(_fresh()), perturb_weights(_fresh()), perturb_weights(_fresh(), seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_output(a), _output(b))
    assert not torch.equal(_output(a), _output(c))


def test_fresh_dit_samples_the_same_in_bf16_and_fp32_so_the_check_refuses_it():
    runs = bf16_and_fp32_samples(_fresh(), SHAPE, 10, "cpu")
    # zero velocity: every sample is its starting noise, whatever precision the model ran in
    assert torch.equal(runs["fp32"], runs["noise"]) and torch.equal(runs["bf16"], runs["fp32"])
    with pytest.raises(AssertionError, match="still fresh"):
        check_bf16_close_to_fp32(runs)


def test_bf16_sampling_is_close_to_fp32_on_the_cpu():
    runs = bf16_and_fp32_samples(perturb_weights(_fresh()), SHAPE, 10, "cpu")
    err, moved = check_bf16_close_to_fp32(runs)
    assert err > 0 and moved > 0.1
