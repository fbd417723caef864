"""What keeps a GPU busy, proved on CPU: no host reads in a training step, uint8 batches, fp32 ODE state.

A tensor on the ``meta`` device has a shape and a dtype but no values: reading
one on the host (``.item()``, ``bool()``, ``.tolist()``) raises. A training step
that runs on meta tensors therefore makes no host sync of its own.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ddm.data.loader import sample_stream
from ddm.data.shards import load_manifest, shard_paths
from ddm.devices import autocast_dtype
from ddm.ensemble import Ensemble
from ddm.errors import BadInput, Diverged
from ddm.flow import FlowPath
from ddm.images import batch_to_model_space_on_device, to_model_space
from ddm.sampling.solvers import sample
from ddm.stages import train_expert
from ddm.train.loss_watch import LossWatch
from ddm.train.modules import ExpertModule, RouterModule
from tests.fabricate import make_partitions

TINY = dict(size="DiT-T/4", image_size=8, in_channels=1, num_classes=3)


def _meta_batch(with_cluster: bool = False):
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    return (x, y, y.clone()) if with_cluster else (x, y)


def test_training_steps_make_no_host_read():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer warns and does nothing
        expert = ExpertModule(model=TINY, flow={}).to("meta")
        router = RouterModule(model=dict(TINY, size="DiT-N/4", num_outputs=2), flow={}).to("meta")
        for _ in range(3):
            assert expert.training_step(_meta_batch(), 0).device.type == "meta"
            assert router.training_step(_meta_batch(with_cluster=True), 0).device.type == "meta"


def test_a_diverged_loss_is_named_at_its_own_step_when_checked_later():
    watch = LossWatch("expert 2", every=5)
    for step in range(5):
        watch.add(torch.tensor(float("nan") if step == 3 else 0.5), step)
        assert watch.due(step) == (step >= 5)
    with pytest.raises(Diverged, match="expert 2: the loss is nan at step 3") as caught:
        watch.check(4)
    assert caught.value.step == 3


def test_a_finite_run_passes_its_checks_and_keeps_its_recent_losses():
    watch = LossWatch("router", every=2)
    for step in range(30):
        watch.add(torch.tensor(float(step)), step)
        if watch.due(step):
            watch.check(step)
    assert sorted(watch.recent()) == [float(s) for s in range(10, 30)]  # the last 20
    with pytest.raises(ValueError, match="at least 1"):
        LossWatch("router", every=0)


def test_no_checkpoint_is_written_of_diverged_weights(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run")
    original = train_expert.ExpertModule.training_step

    def poisoned(self, batch, idx):
        x, y = batch
        return original(self, (x * float("nan") if self.global_step == 1 else x, y), idx)

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", poisoned)
    # the NaN check runs every 10 steps, the checkpoint at step 3: the checkpoint's own check stops it
    with pytest.raises(Diverged, match="at step 1"):
        train_expert.run(fast_cfg("expert.steps=8", "expert.ckpt_every=3", "expert.nan_check_every=10"))
    assert not list((rd.expert(0) / "checkpoints").glob("*.ckpt"))


def test_uint8_batches_are_scaled_on_their_device_exactly_as_images_are():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    want = to_model_space(pixels[0, 0].numpy())
    got = batch_to_model_space_on_device(pixels)
    assert got.dtype == torch.float32 and torch.equal(got[0], want)
    assert got.min() == -1 and got.max() == 1
    latents = torch.randn(2, 4, 8, 8)
    assert batch_to_model_space_on_device(latents) is latents  # floats are model space already
    with pytest.raises(TypeError, match="uint8 pixels or floating point"):
        batch_to_model_space_on_device(torch.zeros(2, 1, 4, 4, dtype=torch.int32))


def test_the_training_loader_yields_uint8_pixels(tmp_path):
    rd = make_partitions(tmp_path / "run")
    manifest = load_manifest(rd.partition(0))
    x, y = next(iter(sample_stream(shard_paths(rd.partition(0), manifest), 1, seed=0, shuffle_buffer=4)))
    assert x.dtype == torch.uint8 and x.shape == (1, manifest["image_size"], manifest["image_size"])


def test_compiling_keeps_the_state_dict_names():
    module = ExpertModule(model=TINY, flow={}, compile=True)
    before = list(module.state_dict())
    module.on_fit_start()
    assert module.net._compiled_call_impl is not None  # compiled lazily: nothing is traced until a forward
    assert list(module.state_dict()) == before
    plain = ExpertModule(model=TINY, flow={})
    plain.on_fit_start()
    assert plain.net._compiled_call_impl is None


class _Linear(torch.nn.Module):
    """v = W x: a velocity field whose matmul autocast turns to bf16."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.seen: list[torch.dtype] = []

    def forward(self, x, t, y=None):
        out = self.lin(x.flatten(1))
        self.seen.append(out.dtype)
        return out.reshape(x.shape)


def test_autocast_sampling_runs_the_model_in_bf16_and_keeps_the_state_fp32():
    torch.manual_seed(0)
    model = _Linear()
    kwargs = dict(steps=4, generator=torch.Generator().manual_seed(1))
    fp32 = sample(model, FlowPath(), (3, 1, 4, 4), **kwargs)
    assert model.seen == [torch.float32] * 4
    model.seen.clear()
    kwargs["generator"] = torch.Generator().manual_seed(1)
    bf16 = sample(model, FlowPath(), (3, 1, 4, 4), autocast=torch.bfloat16, **kwargs)
    assert model.seen == [torch.bfloat16] * 4
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_routing_probabilities_are_fp32_under_bf16_logits():
    class Bf16Router(torch.nn.Module):
        num_outputs = 2

        def forward(self, x, t, y=None):
            return torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)], 1).to(torch.bfloat16)

    ens = Ensemble({0: _Linear(), 1: _Linear()}, Bf16Router(), strategy="full")
    _, weights = ens.route(torch.randn(5, 1, 4, 4), torch.full((5,), 0.5))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(5))


def test_precision_names_are_checked():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # bf16 matmuls are slow on most CPUs
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(BadInput, match="sample.precision='fp16' is not one of auto, bf16, fp32"):
        autocast_dtype("fp16", cpu, "sample.precision")


def test_sample_stage_refuses_a_bad_precision(fast_cfg, tmp_path):
    from ddm.stages import sample as sample_stage

    make_partitions(tmp_path / "run")
    with pytest.raises(BadInput, match="sample.precision"):
        sample_stage.run(fast_cfg("sample.precision=half"))
