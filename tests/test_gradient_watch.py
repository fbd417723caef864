"""A non-finite gradient under a finite loss stops training before those weights are checkpointed.

Gradient-norm clipping does not raise on NaN or inf, so such a step writes them
into the weights and the EMA; watching the loss alone would see it one step
later, after a checkpoint of the poisoned weights was saved.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddm.errors import Diverged
from ddm.stages import train_expert
from ddm.train.loss_watch import LossWatch, all_finite, local_gradients
from ddm.train.modules import ExpertModule
from tests.fabricate import make_partitions

TINY = dict(size="DiT-N/4", image_size=8, in_channels=1, num_classes=3)


def test_a_non_finite_gradient_is_named_at_its_step_when_checked_later():
    watch = LossWatch("expert 1", every=5)
    for step in range(5):
        watch.add(torch.tensor(0.5), step)  # the loss stays finite throughout
        grads = [torch.ones(3), torch.full((2, 2), float("inf") if step == 3 else 1.0)]
        watch.add_gradients(grads, step)
    with pytest.raises(Diverged, match="expert 1: the gradients are not finite at step 3") as caught:
        watch.check(4)
    assert caught.value.step == 3


def test_the_earlier_of_a_bad_loss_and_a_bad_gradient_is_named():
    watch = LossWatch("router", every=10)
    for step in range(6):
        watch.add(torch.tensor(float("nan") if step >= 2 else 0.1), step)
        watch.add_gradients([torch.full((2,), float("nan") if step >= 4 else 1.0)], step)
    with pytest.raises(Diverged, match="the loss is nan at step 2"):
        watch.check(5)


def test_finite_gradients_pass_and_every_kind_of_bad_value_is_caught():
    assert bool(all_finite([torch.ones(4), torch.zeros(2, 3, dtype=torch.bfloat16)]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not bool(all_finite([torch.ones(4), torch.tensor([1.0, bad])]))
    # large but finite values are not flagged: a sum of squares of these would overflow to inf
    assert bool(all_finite([torch.full((4,), 3e38), torch.full((3,), -3e38)]))
    # tensors of several dtypes (a bf16 network's gradients beside fp32 ones) are checked alike
    assert not bool(all_finite([torch.ones(2, dtype=torch.bfloat16), torch.tensor([float("nan")])]))
    watch = LossWatch("expert 0", every=2)
    for step in range(10):
        watch.add(torch.tensor(1.0), step)
        watch.add_gradients([torch.randn(5)], step)
        if watch.due(step):
            watch.check(step)


def test_watching_gradients_makes_no_host_read():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = ExpertModule(model=TINY, flow={}).to("meta")
    for p in module.net.parameters():
        p.grad = torch.zeros_like(p)  # meta: any read on the host would raise
    module.on_before_optimizer_step(None)
    assert module.losses._first_bad_grad.device.type == "meta"


def test_nan_gradients_with_a_finite_loss_stop_before_a_checkpoint_is_saved(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    losses = []
    original = ExpertModule.training_step

    def recorded(self, batch, idx):
        loss = original(self, batch, idx)
        losses.append(float(loss.detach()))
        return loss

    def poison_gradients(self):
        if self.global_step == 1:  # after the backward of step 1: its loss was finite
            next(self.net.parameters()).grad.fill_(float("nan"))

    monkeypatch.setattr(ExpertModule, "training_step", recorded)
    monkeypatch.setattr(ExpertModule, "on_after_backward", poison_gradients, raising=False)
    # the NaN check every 10 steps, a checkpoint at step 2: the checkpoint's own check must stop it
    cfg = fast_cfg("expert.steps=6", "expert.ckpt_every=2", "expert.nan_check_every=10", "expert.grad_clip=1.0")
    with pytest.raises(Diverged, match="expert 0: the gradients are not finite at step 1"):
        train_expert.run(cfg)
    assert losses and all(torch.isfinite(torch.tensor(losses[:2])))  # steps 0 and 1 had finite losses
    assert not list((rd.expert(0) / "checkpoints").glob("*.ckpt"))
    assert not rd.expert_weights(0).exists()


def test_empty_gradient_shards_are_left_out_of_the_check():
    # FSDP shards each parameter on dim 0: with more ranks than rows (a router head of K outputs on 16 GPUs)
    # some ranks hold an empty slice, on which a max-norm would raise
    weights = [torch.nn.Parameter(torch.zeros(0, 32)), torch.nn.Parameter(torch.zeros(3))]
    for w in weights:
        w.grad = torch.zeros_like(w)
    grads = local_gradients(weights)
    assert [tuple(g.shape) for g in grads] == [(3,)]
    watch = LossWatch("router", every=1)
    watch.add(torch.tensor(0.1), 0)
    watch.add_gradients(grads, 0)
    watch.check(0)


def _rank(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        watch = LossWatch(f"expert on rank {rank}", every=5)
        for step in range(5):
            watch.add(torch.tensor(0.5), step)  # finite on both ranks
            bad = rank == 1 and step == 3  # only rank 1's shard of the gradient went bad
            watch.add_gradients([torch.full((4,), float("nan") if bad else 1.0)], step)
        strategy = SimpleNamespace(world_size=2, root_device=torch.device("cpu"))
        try:
            watch.check(4, strategy)
            message = "no error"
        except Diverged as e:
            message = f"{e.step}|{e}"
        Path(f"{out}-{rank}").write_text(message)
    finally:
        dist.destroy_process_group()


def test_a_bad_gradient_on_one_rank_stops_every_rank_naming_its_step(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        step, message = Path(f"{out}-{rank}").read_text().split("|", 1)
        # rank 0 saw nothing itself, yet names rank 1's step and what went wrong there, not "a loss on another rank"
        assert step == "3" and "the gradients are not finite at step 3" in message, (rank, message)
