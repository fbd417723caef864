"""What keeps a GPU busy in evaluation, proved on the CPU: the evaluation's networks read nothing on the host
inside their batch loops, move each batch to the device once (images as uint8), and the VAE decodes under
bf16 autocast on a GPU.

A tensor on the ``meta`` device has a shape and a dtype but no values: reading one on the host (``.item()``,
``.cpu()``, ``.tolist()``, ``bool()``) raises. A loop that runs on meta tensors therefore makes no host sync of
its own, and every copy from the CPU to ``meta`` is an upload, which a dispatch mode counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddm.eval import feature_net as fnet
from ddm.eval.fm_loss import loss_totals
from ddm.eval.router_diag import router_probs_on_device
from ddm.flow import FlowPath
from ddm.images import model_space_on
from ddm.latent import run_latents as rl

META = torch.device("meta")


class Uploads(TorchDispatchMode):
    """Records the dtype and shape of every tensor copied from the CPU to another device."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[torch.dtype, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = out
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type != "cpu":
                self.copies.append((src.dtype, tuple(src.shape)))
        return out


def test_feature_net_batches_cross_once_as_uint8_and_nothing_is_read_back():
    net = fnet.FeatureNet(3, 5, width=8).to(META)
    images = np.zeros((10, 16, 16, 3), dtype=np.uint8)
    with Uploads() as up:
        out = fnet.batched_on_device(net.features, images, 4, META)
    assert out.device == META and out.shape == (10, 32) and out.dtype == torch.float32
    assert up.copies == [(torch.uint8, (4, 16, 16, 3)), (torch.uint8, (4, 16, 16, 3)), (torch.uint8, (2, 16, 16, 3))]


def test_feature_net_grey_images_cross_as_uint8_and_logits_stay_on_the_device():
    net = fnet.FeatureNet(1, 3, width=8).to(META)
    with Uploads() as up:
        logits = fnet.batched_on_device(net, np.zeros((5, 8, 8), dtype=np.uint8), 256, META)
    assert logits.device == META and logits.shape == (5, 3)
    assert up.copies == [(torch.uint8, (5, 8, 8))]


def test_uint8_images_are_scaled_on_the_device_as_on_the_host():
    from ddm.images import batch_to_model_space

    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    on_device = model_space_on(images, "cpu")
    host = batch_to_model_space(images)
    assert torch.equal(on_device, host) and on_device.stride() == host.stride()


def test_feature_net_training_reads_the_loss_after_the_loop_only(monkeypatch):
    steps = []
    real = fnet.F.cross_entropy

    def counted(*args, **kwargs):
        steps.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fnet.F, "cross_entropy", counted)
    images = np.zeros((40, 8, 8), dtype=np.uint8)
    settings = dict(arch=dict(in_channels=1, num_classes=2, width=8), steps=30, batch_size=8, lr=1e-3, seed=0)
    # on meta tensors the first read on the host raises: it comes after every step, when the last losses are read
    with pytest.raises(RuntimeError, match="meta"):
        fnet._train(images, np.arange(40) % 2, settings, META)
    assert len(steps) == 30


class LinearRouter(torch.nn.Module):
    num_outputs = 4

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2 * 4 * 4, 4)

    def forward(self, x, t, y):
        return self.lin(x.flatten(1)) * (1 - t[:, None])


def test_router_probabilities_stay_on_the_device_with_one_upload_per_batch():
    router = LinearRouter().to(META)
    x, t = torch.zeros(10, 2, 4, 4), torch.rand(10)
    y = torch.zeros(10, dtype=torch.long)
    with Uploads() as up:
        probs = router_probs_on_device(router, x, t, y, batch_size=4, device=META)
    assert probs.device == META and probs.shape == (10, 4)
    # t once for every batch, then each batch's images and labels
    shapes = [shape for _, shape in up.copies]
    assert shapes == [(10,), (4, 2, 4, 4), (4,), (4, 2, 4, 4), (4,), (2, 2, 4, 4), (2,)]


def test_router_device_defaults_to_the_routers_own():
    router = LinearRouter().to(META)
    assert router_probs_on_device(router, torch.zeros(3, 2, 4, 4), torch.rand(3), None).device == META


class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, y):
        return self.conv(x) * t[:, None, None, None]


def test_fm_loss_totals_stay_on_the_device_with_one_upload_per_batch():
    model = Conv().to(META)
    x0 = torch.zeros(10, 2, 4, 4)
    with Uploads() as up:
        totals = loss_totals(model, FlowPath(), x0, None, [0.2, 0.7], seed=0, batch_size=4, device=META)
    assert totals.device == META and totals.shape == (2,) and totals.dtype == torch.float64
    # per t and batch: the images and their noise, nothing else
    shapes = [shape for _, shape in up.copies]
    assert shapes == [(4, 2, 4, 4)] * 4 + [(2, 2, 4, 4)] * 2 + [(4, 2, 4, 4)] * 4 + [(2, 2, 4, 4)] * 2


def test_fm_loss_totals_are_the_sum_of_the_batch_means_in_float64():
    model = Conv()
    x0 = torch.randn(10, 2, 4, 4)
    a = loss_totals(model, FlowPath(), x0, None, [0.3], seed=1, batch_size=3, device="cpu")
    b = loss_totals(model, FlowPath(), x0, None, [0.3], seed=1, batch_size=10, device="cpu")
    assert torch.allclose(a, b, rtol=1e-6)


def test_vae_images_cross_as_uint8():
    with Uploads() as up:
        x = model_space_on(np.zeros((3, 8, 8, 3), dtype=np.uint8), META)
    assert x.device == META and x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert up.copies == [(torch.uint8, (3, 8, 8, 3))]


def _latents(monkeypatch, precision, device: str, bf16: bool = True) -> rl.RunLatents:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(rl.RunLatents, "device", property(lambda self: torch.device(device)))
    return rl.RunLatents(torch.nn.Identity(), 3, 4, precision)


@pytest.mark.parametrize(
    "precision, device, bf16, expected",
    [
        ("auto", "cuda", True, torch.bfloat16),  # a GPU with bf16: the decode is autocast to it
        (None, "cuda:1", True, torch.bfloat16),  # vae.precision unset (vae=none) is auto
        ("auto", "cuda", False, None),  # a GPU without bf16: fp32
        ("fp32", "cuda", True, None),
        ("auto", "cpu", True, None),  # the CPU: fp32, the same numbers as before
    ],
)
def test_the_vae_runs_in_bf16_on_a_gpu_and_fp32_on_the_cpu(monkeypatch, precision, device, bf16, expected):
    assert _latents(monkeypatch, precision, device, bf16).autocast == expected


class Recorded:
    """Stands in for torch.autocast: records what was asked for, changes nothing."""

    calls: list = []

    def __init__(self, device_type, dtype=None, **kwargs):
        Recorded.calls.append((device_type, dtype))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_decode_asks_for_bf16_autocast_on_a_gpu(monkeypatch):
    Recorded.calls = []
    monkeypatch.setattr(torch, "autocast", Recorded)
    latents = _latents(monkeypatch, "auto", "cuda")
    with latents._precision():
        pass
    assert Recorded.calls == [("cuda", torch.bfloat16)]


def test_decode_and_encode_run_inside_the_chosen_precision(monkeypatch, tmp_path):
    from ddm.latent import LatentCodec
    from tests.test_latent_vae import tiny_vae

    Recorded.calls = []
    monkeypatch.setattr(torch, "autocast", Recorded)
    codec = LatentCodec(tiny_vae(), "tiny")
    auto = rl.RunLatents(codec, 3, 2, "auto")
    z = auto.encode(np.zeros((3, 16, 16, 3), dtype=np.uint8))
    images = auto.decode(z)
    assert Recorded.calls == []  # the CPU: fp32, no autocast at all
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    rl.RunLatents(codec, 3, 2, "bf16").decode(z)
    assert Recorded.calls == [("cpu", torch.bfloat16)]  # one autocast around every batch of the decode


def test_features_and_classes_in_one_pass_are_those_of_two():
    torch.manual_seed(0)
    net = fnet.FeatureNet(3, 7, width=8).eval()
    images = np.random.default_rng(1).integers(0, 256, (11, 12, 12, 3), dtype=np.uint8)
    features, classes = fnet.features_and_classes(net, images, 4)
    assert np.array_equal(features, fnet.features(net, images, 4)) and features.dtype == np.float64
    assert np.array_equal(classes, fnet.predict(net, images, 4)) and classes.dtype == np.int64
