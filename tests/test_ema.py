"""The expert's EMA: its update sequence, and a resumed job's EMA equals that of a job never stopped."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from ddm.train.ema import ema_decay_at
from tests.fsdp_island import STEPS, island_config, train


class NetAfterEachStep(Callback):
    """The network's weights at every batch end (after the optimizer step of that batch)."""

    def __init__(self):
        self.weights: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_the_ema_moves_once_per_step_with_the_warmed_up_decay(tmp_path):
    after = NetAfterEachStep()
    run = train(tmp_path, island_config("auto", 1, 1), rank=0, world=1, steps=STEPS, callbacks=[after])
    expected = dict(run["init"])
    for step, weights in enumerate(after.weights, start=1):
        decay = ema_decay_at(step, 0.9)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    assert len(after.weights) == STEPS
    for name, value in expected.items():
        torch.testing.assert_close(run["ema"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_a_resumed_job_has_the_ema_of_a_job_never_stopped(tmp_path):
    island = island_config("auto", 1, 1)
    straight = train(tmp_path / "straight", island, rank=0, world=1, steps=STEPS)
    train(tmp_path / "resumed", island, rank=0, world=1, steps=2)
    resumed = train(tmp_path / "resumed", island, rank=0, world=1, steps=STEPS, resume=True)
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("last.ckpt")
    for part in ("net", "ema"):
        for name, value in straight[part].items():
            # a checkpoint written before the EMA took its step's update would lose one update per resume
            torch.testing.assert_close(resumed[part][name], value, rtol=1e-5, atol=1e-7, msg=f"{part}.{name}")
