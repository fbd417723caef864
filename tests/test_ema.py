"""The expert's EMA: its update sequence, and a resumed job's EMA equals that of a job never stopped."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from ddm.train.ema import ema_decay_at, make_ema, update_ema
from tests.fsdp_island import STEPS, island_config, train


@pytest.mark.parametrize(
    "step,decay,want",
    [
        # the documented warm-up, (1 + step) / (10 + step), below the configured decay
        (0, 0.999, 1 / 10),
        (1, 0.999, 2 / 11),
        (8, 0.999, 9 / 18),
        (90, 0.999, 91 / 100),
        (990, 0.9999, 991 / 1000),
        # capped at the configured decay once the warm-up passes it: (1 + 90) / (10 + 90) = 0.91 > 0.9
        (90, 0.9, 0.9),
        (10**6, 0.999, 0.999),
    ],
)
def test_the_decay_warms_up_as_documented_and_is_capped(step, decay, want):
    """``min(decay, (1 + step) / (10 + step))``, the formula its docstring states, written out by hand."""
    assert ema_decay_at(step, decay) == pytest.approx(want, rel=1e-15, abs=0)


def test_one_update_is_decay_times_the_ema_plus_the_rest_times_the_network():
    net = nn.Linear(2, 1, dtype=torch.float64)
    ema = make_ema(net)
    with torch.no_grad():
        for param, value in ((ema.weight, 1.0), (ema.bias, -2.0), (net.weight, 3.0), (net.bias, 4.0)):
            param.fill_(value)
    update_ema(ema, net, 0.75)
    # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * -2 + 0.25 * 4 = -0.5
    assert ema.weight.tolist() == [[1.5, 1.5]] and ema.bias.tolist() == [-0.5]
    assert net.weight.tolist() == [[3.0, 3.0]] and not ema.weight.requires_grad


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
