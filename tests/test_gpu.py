"""On a CUDA device: the training step makes no host sync, AdamW is fused, bf16 sampling stays close to fp32.

Skipped without CUDA (see conftest); ``scripts/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ddm.models.dit import DiT
from ddm.train.modules import ExpertModule
from tests.perturb import bf16_and_fp32_samples, check_bf16_close_to_fp32, perturb_weights

pytestmark = pytest.mark.gpu

TINY = dict(size="DiT-S/2", image_size=32, in_channels=4, num_classes=10)


def test_expert_training_step_makes_no_host_sync():
    module = ExpertModule(model=TINY, flow={}).cuda()
    x = torch.randint(0, 256, (8, 4, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        module.training_step((x, y), 0)  # first call: lazy allocations may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss = module.training_step((x, y), 0)
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_adamw_is_fused_on_cuda():
    module = ExpertModule(model=TINY, flow={}).cuda()
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True


def test_bf16_sampling_is_close_to_fp32():
    torch.manual_seed(0)
    # a fresh DiT outputs exactly zero (adaLN-Zero): bf16 and fp32 would agree exactly whatever autocast did
    net = perturb_weights(DiT("DiT-S/2", 32, 4, 10)).cuda().eval()
    check_bf16_close_to_fp32(bf16_and_fp32_samples(net, (8, 4, 32, 32), 10, "cuda"))
