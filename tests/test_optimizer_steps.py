"""What happens at an optimizer step: the EMA moves once per step (not per micro-batch); gradients are clipped."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddm.errors import BadInput
from ddm.flow import FlowPath, PathSample
from ddm.settings import Island, build
from ddm.stages import train_expert
from ddm.train.modules import ExpertModule
from ddm.train.trainer import build_trainer
from tests.fabricate import make_partitions

STEPS, BATCH = 4, 8


class FixedNoiseExpert(ExpertModule):
    """An expert whose (t, eps) are functions of the sample itself, so a micro-batch split draws the same noise.

    Plain SGD: Adam would turn the rounding differences of two batch splits in near-zero gradients
    (adaLN-Zero starts many at zero) into steps of the size of the learning rate.
    """

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        x0, y = batch
        t = 0.05 + 0.9 * (x0.flatten(1).mean(1) * 37.0).frac().abs()  # [B] in (0.05, 0.95)
        eps = torch.sin(13.0 * x0 + 1.0)
        point = PathSample(x_t=self.path.interpolate(x0, eps, t), t=t, eps=eps, target=self.path.velocity(x0, eps, t))
        return FlowPath.loss_at(self.net, point, y).mean()


def _train(tmp_path, accumulate: int, grad_clip: float | None = None, steps: int = STEPS, module=None) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 1, 8, 8, generator=g)
    y = torch.randint(3, (STEPS * BATCH,), generator=g)
    module = module or FixedNoiseExpert(
        model=dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3),
        flow=dict(schedule="linear"),
        lr=1e-2,
        warmup_steps=1,
        total_steps=STEPS,
        label_dropout=0.0,
        ema_decay=0.9,
    )
    island = build(
        Island,
        dict(
            accelerator="cpu",
            devices=1,
            num_nodes=1,
            strategy="auto",
            sharding="full",
            activation_checkpointing=False,
            precision="32-true",
            threads=1,
            accumulate_grad_batches=accumulate,
        ),
        "island",
    )
    trainer = build_trainer(
        island, tmp_path / f"acc{accumulate}-{grad_clip}", steps, ckpt_every=100, logger=False, grad_clip=grad_clip
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH // accumulate, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps
    return {k: v.detach().clone() for k, v in module.ema.state_dict().items()}


def _net_change(tmp_path, grad_clip):
    """How far one SGD step (lr 0.1) moves the weights, with the trainer's gradient clipping."""
    torch.manual_seed(0)
    module = FixedNoiseExpert(
        model=dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3), flow=dict(schedule="linear")
    )
    before = [p.detach().clone() for p in module.net.parameters()]
    _train(tmp_path, 1, grad_clip=grad_clip, steps=1, module=module)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(module.net.parameters(), before)]).norm().item()


def test_gradient_clipping_bounds_the_step(tmp_path):
    clip, lr = 1e-4, 0.1
    unclipped = _net_change(tmp_path / "free", None)
    clipped = _net_change(tmp_path / "clipped", clip)
    assert unclipped > 10 * lr * clip  # the gradient is far larger than the bound: clipping has work to do
    assert 0 < clipped <= lr * clip * (1 + 1e-3)  # one SGD step moves the weights by lr x the clipped norm


def test_accumulating_four_micro_batches_gives_the_ema_of_one_batch(tmp_path):
    whole, split = _train(tmp_path, 1), _train(tmp_path, 4)
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the EMA moved away from its start: the comparison is not of two untouched copies
    start = FixedNoiseExpert(
        model=dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3), flow=dict(schedule="linear")
    ).ema.state_dict()
    assert any(not torch.equal(whole[k], start[k]) for k in whole if k.endswith("weight") and "ada" in k)


def test_adamw_betas_come_from_the_config_and_bad_ones_are_refused(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    train_expert.run(fast_cfg("expert.steps=2", "expert.ckpt_every=2", "expert.betas=[0.8,0.95]"))
    ckpt = torch.load(rd.expert(0) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["betas"] == (0.8, 0.95)
    with pytest.raises(BadInput, match=r"betas=.*\[0, 1\)"):
        ExpertModule(model=dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3), flow={}, betas=(0.9, 1.5))
    with pytest.raises(BadInput, match="two numbers"):
        ExpertModule(model=dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3), flow={}, betas=(0.9,))
