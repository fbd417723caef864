"""Every evaluation metric against a case whose answer is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble, experts_per_sample
from ddm.eval.feature_net import FeatureNet, accuracy, features, train_feature_net
from ddm.eval.fid import frechet_distance, frechet_distance_features, gaussian_stats
from ddm.eval.flops import (
    count_flops,
    measured_sampling_flops,
    model_forward_flops,
    sampling_flops_per_image,
)
from ddm.eval.flops_summary import training_flops
from ddm.eval.fm_loss import heldout_fm_loss
from ddm.eval.inception import InceptionFeatures, load_inception, resize_bilinear_tf1, to_tf_inception_input
from ddm.eval.prdc import precision_recall
from ddm.eval.router_diag import expected_calibration_error, router_diagnostics
from ddm.flow import FlowPath
from ddm.models.dit import DiT, DiTClassifier
from tests.fabricate import cluster_image
from tests.real_inception import REAL_INCEPTION, digits, needs_real_inception


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T


# --------------------------------------------------------------------------- Fréchet distance


def test_fd_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 32)) * 3 + 5
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fd_matches_the_closed_form_for_commuting_covariances():
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_fd_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_cov(rng, 6), _random_cov(rng, 6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_fd_of_sampled_gaussians_approaches_the_analytic_value():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(3), np.array([1.0, -1.0, 0.5])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 1.0, 0.5])
    analytic = frechet_distance(mu1, s1, mu2, s2)
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    # Sampling error of the means and covariances at this n is about 0.02.
    assert frechet_distance_features(a, b) == pytest.approx(analytic, abs=0.06)


def test_fd_is_symmetric_and_non_negative_even_for_singular_covariances():
    rng = np.random.default_rng(3)
    for rank in (8, 3):  # full rank, then fewer samples' worth of rank than dimensions
        s1, s2 = _random_cov(rng, 8, rank), _random_cov(rng, 8, rank)
        mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
        ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
        assert ab >= 0 and math.isfinite(ab)
        assert ab == pytest.approx(ba, rel=1e-9)
    few = rng.normal(size=(5, 16))  # 5 samples in 16 dimensions: a singular covariance
    assert frechet_distance_features(few, few) == pytest.approx(0.0, abs=1e-6)
    mu, sigma = gaussian_stats(few)
    assert mu.shape == (16,) and sigma.shape == (16, 16)


def test_fd_with_fewer_samples_than_dimensions_equals_the_covariance_form():
    """Fewer samples than dimensions take the samples' cross product: the same distance, no D x D matrix."""
    rng = np.random.default_rng(4)
    for na, nb, d in ((7, 12, 40), (30, 5, 64), (20, 20, 21)):
        a = rng.normal(size=(na, d)) @ rng.normal(size=(d, d)) + 1.0
        b = rng.normal(size=(nb, d)) * 2 - 0.5
        want = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
        # the covariance form's D x D eigendecompositions of a singular matrix round at about 1e-8
        assert frechet_distance_features(a, b) == pytest.approx(want, rel=1e-7)
        assert frechet_distance_features(b, a) == pytest.approx(want, rel=1e-7)
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- precision / recall


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(4).normal(size=(300, 10))
    assert precision_recall(x, x, k=3) == dict(precision=1.0, recall=1.0, k=3)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(200, 10)), rng.normal(size=(200, 10)) + 100
    pr = precision_recall(real, fake, k=5)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_precision_recall_by_hand():
    # k = 1. Real radii: 1, 1, 1, 1 (neighbours one apart) and 97 for the outlier at 100.
    # Fake radii: 9.5 each (the two fake points are 9.5 apart).
    real = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    fake = np.array([[0.5], [10.0]])
    pr = precision_recall(real, fake, k=1)
    # 0.5 is within 1 of 0; 10 is within 97 of 100 -> both fake points are inside the real manifold.
    assert pr["precision"] == 1.0
    # Real 0..3 are within 9.5 of a fake point; 100 is not -> 4 of 5.
    assert pr["recall"] == pytest.approx(0.8)


# --------------------------------------------------------------------------- router diagnostics


class OracleRouter(nn.Module):
    """Clusters at x0 = -1 and x0 = +1 everywhere: the sign of the image mean names the cluster."""

    num_outputs = 2

    def forward(self, x, t, y=None):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([-50 * m, 50 * m], dim=1)


class ConstantRouter(nn.Module):
    """Always p = (0.7, 0.3), whatever the input."""

    num_outputs = 2

    def forward(self, x, t, y=None):
        return torch.tensor([0.7, 0.3]).log().expand(len(x), 2)


def _two_cluster_data(n=400):
    k = torch.arange(n) % 2
    x0 = (2.0 * k - 1).reshape(-1, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return x0, k


def test_a_perfect_router_is_exact_at_t_zero_and_falls_to_chance_at_noise():
    x0, k = _two_cluster_data()
    rows = router_diagnostics(OracleRouter(), FlowPath(), x0, None, k, buckets=10, seed=0)
    assert rows[0]["t_lo"] == 0.0 and rows[0]["accuracy"] == 1.0
    assert rows[0]["prior_accuracy"] == pytest.approx(0.5)
    assert rows[-1]["accuracy"] < 0.8  # at t ~ 1 the image is almost pure noise


def test_calibration_of_a_constant_probability_router():
    x0, k = _two_cluster_data()
    rows = router_diagnostics(ConstantRouter(), FlowPath(), x0, None, k, buckets=3, seed=0)
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    nll = -(0.5 * math.log(0.7) + 0.5 * math.log(0.3))
    for r in rows:
        assert r["accuracy"] == pytest.approx(0.5)  # always answers cluster 0; half the images are
        assert r["confidence"] == pytest.approx(0.7)
        assert r["ece"] == pytest.approx(0.2)  # |0.7 - 0.5| in the one bin used
        assert r["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert r["nll"] == pytest.approx(nll, rel=1e-5)
        assert r["prior_entropy"] == pytest.approx(math.log(2))


def test_ece_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # Bin 0.9-1.0: acc 1, conf 0.95 -> 0.05; bin 0.5-0.6: acc 0.5, conf 0.55 -> 0.05; each holds half.
    assert expected_calibration_error(conf, correct, bins=10) == pytest.approx(0.05)


# --------------------------------------------------------------------------- FLOPs


def test_flops_of_a_linear_stack():
    a, b, c = 7, 11, 5
    net = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    assert count_flops(net, torch.zeros(1, a)) == 2 * (a * b + b * c)
    assert count_flops(net, torch.zeros(6, a)) == 6 * 2 * (a * b + b * c)


def _tiny_ensemble(strategy, top_k=2, **routing):
    torch.manual_seed(0)
    experts = [DiT("DiT-N/2", image_size=8, in_channels=1, num_classes=3) for _ in range(3)]
    for e in experts:  # adaLN-Zero starts at zero output; random weights route and count the same
        for p in e.parameters():
            nn.init.normal_(p, std=0.05)
    router = DiTClassifier(3, "DiT-N/4", image_size=8, in_channels=1, num_classes=3)
    return Ensemble(
        experts, router, strategy=strategy, top_k=top_k, generator=torch.Generator().manual_seed(0), **routing
    ).eval()


@pytest.mark.parametrize(
    "strategy,solver,cfg_scale",
    [("top1", "euler", 1.5), ("topk", "heun", 1.0), ("full", "heun", 1.5), ("sample", "euler", 1.0)],
)
def test_sampling_flops_formula_matches_the_counter(strategy, solver, cfg_scale):
    ens = _tiny_ensemble(strategy)
    shape = (1, 8, 8)
    expert = model_forward_flops(ens.experts["0"], shape)
    router = model_forward_flops(ens.router, shape)
    formula = sampling_flops_per_image(
        expert, router, strategy, steps=3, solver=solver, cfg_scale=cfg_scale, num_experts=3, top_k=2
    )
    measured = measured_sampling_flops(
        ens, FlowPath(), shape, torch.tensor([0, 1, 2]), steps=3, solver=solver, cfg_scale=cfg_scale
    )
    assert measured == formula["per_image"]


@pytest.mark.parametrize("strategy,solver", [("top1", "euler"), ("topk", "heun"), ("full", "euler")])
def test_sampling_flops_formula_with_a_guidance_interval_matches_the_counter(strategy, solver):
    """Only the calls inside sample.cfg_interval run the doubled batch: fewer FLOPs, counted the same."""
    ens = _tiny_ensemble(strategy)
    shape = (1, 8, 8)
    expert = model_forward_flops(ens.experts["0"], shape)
    router = model_forward_flops(ens.router, shape)
    interval = (0.3, 0.8)
    kw = dict(steps=5, solver=solver, cfg_scale=2.0, num_experts=3, top_k=2)
    formula = sampling_flops_per_image(expert, router, strategy, **kw, cfg_interval=interval)
    everywhere = sampling_flops_per_image(expert, router, strategy, **kw)
    unguided = sampling_flops_per_image(expert, router, strategy, **{**kw, "cfg_scale": 1.0})
    measured = measured_sampling_flops(
        ens, FlowPath(), shape, torch.tensor([0, 1, 2]), steps=5, solver=solver, cfg_scale=2.0, cfg_interval=interval
    )
    assert measured == formula["per_image"]
    assert unguided["per_image"] < formula["per_image"] < everywhere["per_image"]
    assert 0 < formula["guided_calls"] < formula["calls"]


@pytest.mark.parametrize(
    "strategy,cfg_routing,cfg_scale",
    [
        ("threshold", "shared", 1.5),
        ("nucleus", "shared", 1.0),
        ("top1", "separate", 1.5),
        ("threshold", "separate", 1.5),
        ("nucleus", "separate", 1.0),  # no guidance: separate routing changes nothing
    ],
)
def test_sampling_flops_formula_at_the_measured_experts_matches_the_counter(strategy, cfg_routing, cfg_scale):
    """Threshold and nucleus: the formula at the mean experts per call of the counted images is the count."""
    ens = _tiny_ensemble(strategy, threshold=0.2, top_p=0.7, cfg_routing=cfg_routing)
    with torch.no_grad():  # the router's random weights must give rows of one expert and rows of several
        for p in ens.router.head.parameters():
            p.mul_(5.0)
    shape, y = (1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    expert, router = model_forward_flops(ens.experts["0"], shape), model_forward_flops(ens.router, shape)
    usage = []
    measured = measured_sampling_flops(ens, FlowPath(), shape, y, steps=3, cfg_scale=cfg_scale, usage=usage)
    assert ens.usage == [] and len(usage) == 3
    common = dict(steps=3, cfg_scale=cfg_scale, num_experts=3, top_k=2, cfg_routing=cfg_routing)
    formula = sampling_flops_per_image(
        expert,
        router,
        strategy,
        experts_per_call=experts_per_sample(usage, len(y)),
        uncond_experts_per_call=experts_per_sample(usage, len(y), "uncond_counts"),
        **common,
    )
    assert abs(measured - formula["per_image"]) <= 1  # the counter's total is floor-divided by the images
    bound = sampling_flops_per_image(expert, router, strategy, **common)
    guided = cfg_scale != 1.0
    if strategy == "top1":
        assert formula["experts_from"] == "strategy" and formula["experts_per_call"] == 1
    else:
        assert formula["experts_from"] == "usage" and bound["experts_from"] == "bound"
        assert 1 < formula["experts_per_call"] < 3, "the test needs a data-dependent count"
        # without usage: the upper bound, the cost of the full ensemble
        full = sampling_flops_per_image(expert, router, "full", **common)
        assert bound["per_image"] == formula["per_image_max"] == full["per_image"] > formula["per_image"]
    if guided and cfg_routing == "separate":
        assert formula["router_per_call"] == 2 * router and formula["cfg_routing"] == "separate"
        assert "uncond_counts" in usage[0]
    else:
        assert formula["router_per_call"] == router and "cfg_routing" not in formula


def test_sampling_flops_of_experts_of_different_sizes_and_targets():
    """Per-expert FLOPs: full is exact; a sparse strategy's counted cost lies between its cheapest and priciest."""
    from ddm.models.prediction import PredictionToVelocity

    torch.manual_seed(0)
    sizes = ("DiT-N/2", "DiT-T/4", "DiT-N/4")
    experts = [DiT(size, image_size=8, in_channels=1, num_classes=3) for size in sizes]
    for e in experts:
        for p in e.parameters():
            nn.init.normal_(p, std=0.05)
    experts[1] = PredictionToVelocity(experts[1], "eps", FlowPath())  # converting adds no counted FLOPs
    router = DiTClassifier(3, "DiT-N/4", image_size=8, in_channels=1, num_classes=3)
    shape, y = (1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    each = [model_forward_flops(e, shape) for e in experts]
    assert each[1] == model_forward_flops(experts[1].net, shape) and len(set(each)) == 3
    r = model_forward_flops(router, shape)
    for strategy, cfg_scale in (("full", 1.5), ("top1", 1.0), ("topk", 1.5)):
        ens = Ensemble(experts, router, strategy=strategy, top_k=2).eval()
        formula = sampling_flops_per_image(
            each, r, strategy, steps=2, solver="euler", cfg_scale=cfg_scale, num_experts=3, top_k=2
        )
        measured = measured_sampling_flops(ens, FlowPath(), shape, y, steps=2, cfg_scale=cfg_scale)
        if strategy == "full":
            assert measured == formula["per_image"] and "per_image_min" not in formula
        else:
            assert formula["per_image_min"] <= measured <= formula["per_image_max"]
            assert formula["per_image_min"] < formula["per_image"] < formula["per_image_max"]
    same = sampling_flops_per_image([each[0]] * 3, r, "top1", steps=2)
    assert same == sampling_flops_per_image(each[0], r, "top1", steps=2)  # one size: the rows of before


def test_sampling_flops_of_a_single_model():
    torch.manual_seed(0)
    model = DiT("DiT-N/2", image_size=8, in_channels=1, num_classes=0)
    fwd = model_forward_flops(model, (1, 8, 8), conditional=False)
    formula = sampling_flops_per_image(fwd, 0, None, steps=4, solver="euler", cfg_scale=2.0, conditional=False)
    assert formula["per_image"] == 4 * fwd  # unconditional: guidance does not double anything
    assert measured_sampling_flops(model, FlowPath(), (1, 8, 8), None, steps=4) == formula["per_image"]


def test_training_flops_from_records():
    assert training_flops(dict(train_flops=123)) == (123, False)
    assert training_flops(dict(samples_seen=10), forward_flops=7) == (210, True)
    assert training_flops(dict(samples_seen=10, forward_flops_per_sample=5), forward_flops=7) == (150, True)
    assert training_flops({}) == (None, True)


# --------------------------------------------------------------------------- flow-matching loss


class ExactSinglePointVelocity(nn.Module):
    """The marginal velocity when the data is one point c (linear path): v(x, t) = (x - c) / t."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x, t, y=None):
        return (x - self.c) / t.reshape(-1, 1, 1, 1)


def test_fm_loss_of_the_exact_velocity_is_zero():
    c = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    x0 = c.expand(200, 1, 4, 4).clone()
    out = heldout_fm_loss(ExactSinglePointVelocity(c), FlowPath(), x0, None, [0.1, 0.5, 0.9], seed=3)
    assert out["mean"] == pytest.approx(0.0, abs=1e-10)
    assert [r["t"] for r in out["per_t"]] == [0.1, 0.5, 0.9] and out["num_samples"] == 200


def test_fm_loss_of_a_zero_model_is_its_expected_value():
    # Target (linear path) = eps - x0: E (eps - c)^2 = 1 + c^2 per element, at every t.
    c = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    x0 = c.expand(2000, 1, 4, 4).clone()
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731 - an analytic model is a plain function
    out = heldout_fm_loss(zero, FlowPath(), x0, None, [0.2, 0.8], seed=0, batch_size=512)
    expected = 1 + (c**2).mean().item()
    assert all(r["loss"] == pytest.approx(expected, abs=0.05) for r in out["per_t"])


def test_fm_loss_noise_is_fixed_whatever_the_batch_size():
    x0 = torch.randn(50, 1, 4, 4)
    model = lambda x, t, y: 0.5 * x  # noqa: E731
    a = heldout_fm_loss(model, FlowPath(), x0, None, [0.3, 0.7], seed=1, batch_size=7)
    b = heldout_fm_loss(model, FlowPath(), x0, None, [0.3, 0.7], seed=1, batch_size=50)
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-6)
    c = heldout_fm_loss(model, FlowPath(), x0, None, [0.3, 0.7], seed=2)
    assert c["mean"] != pytest.approx(a["mean"], rel=1e-6)


# --------------------------------------------------------------------------- feature net


def _quadrant_data(n=240, seed=0, size=8):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    return np.stack([cluster_image(int(k), rng, size) for k in labels]), labels


def test_feature_net_learns_and_is_cached(tmp_path):
    images, labels = _quadrant_data()
    kw = dict(cache_dir=tmp_path, steps=40, batch_size=32, width=8, seed=0)
    first = train_feature_net((images, labels), 4, **kw)
    assert not first.cached and first.path.exists() and first.space.startswith("classifier:")
    test_x, test_y = _quadrant_data(80, seed=1)
    assert accuracy(first.net, test_x, test_y) > 0.9
    mtime = first.path.stat().st_mtime_ns

    second = train_feature_net((images, labels), 4, **kw)
    assert second.cached and second.checksum == first.checksum
    assert first.path.stat().st_mtime_ns == mtime  # not retrained, not rewritten
    np.testing.assert_array_equal(features(first.net, test_x), features(second.net, test_x))

    changed = images.copy()
    changed[0, 0, 0] ^= 1  # one pixel: another data checksum, another net
    third = train_feature_net((changed, labels), 4, **kw)
    assert not third.cached and third.checksum != first.checksum and third.path != first.path


def test_an_unreadable_cache_file_is_retrained(tmp_path):
    images, labels = _quadrant_data(64)
    kw = dict(cache_dir=tmp_path, steps=2, batch_size=16, width=8)
    first = train_feature_net((images, labels), 4, **kw)
    first.path.write_bytes(b"not a checkpoint")
    again = train_feature_net((images, labels), 4, **kw)
    assert not again.cached and again.checksum == first.checksum
    assert train_feature_net((images, labels), 4, **kw).cached


def test_feature_net_with_a_data_function_reads_no_data_on_a_cache_hit(tmp_path):
    images, labels = _quadrant_data(64)
    calls = []

    def load():
        calls.append(1)
        return images, labels

    kw = dict(cache_dir=tmp_path, data_sha="manifest-sha", channels=1, steps=2, batch_size=16, width=8)
    train_feature_net(load, 4, **kw)
    train_feature_net(load, 4, **kw)
    assert len(calls) == 1


def test_feature_net_handles_any_image_size_and_channels():
    net = FeatureNet(in_channels=3, num_classes=5, width=8)
    for shape in ((4, 13, 13, 3), (2, 40, 40, 3)):
        images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        assert features(net, images).shape == (shape[0], 32)


# --------------------------------------------------------------------------- Inception from a local file


def test_inception_missing_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval\.inception_weights"):
        load_inception(tmp_path / "no-such-inception.pt")
    with pytest.raises(FileNotFoundError, match=r"eval\.inception_weights"):
        load_inception(None)


class _PoolFeatures(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class _NvidiaStyle(nn.Module):
    def forward(self, x, return_features: bool = False):
        return x.mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_inception_loads_a_local_torchscript_file(tmp_path):
    path = tmp_path / "fake_inception.pt"
    torch.jit.save(torch.jit.script(_PoolFeatures()), str(path))
    inc = load_inception(path)
    assert inc.kind == "fid_inception_tf" and inc.space.startswith("inception:")
    images = np.full((3, 8, 8), 255, np.uint8)  # grayscale: repeated to RGB, resized to 299, TF scale
    f = inc(images)
    assert f.shape == (3, 6) and np.allclose(f, 1 - 1 / 128)

    nv = tmp_path / "nv_inception.pt"
    torch.jit.save(torch.jit.script(_NvidiaStyle()), str(nv))
    inc = load_inception(nv)
    assert inc.kind == "fid_inception_nvidia" and np.allclose(inc(images), 255.0)


class _WithWeight(nn.Module):
    def __init__(self):
        super().__init__()
        # a buffer, not a Parameter: a loaded TorchScript module's parameters move to a GPU but not to the meta
        # device (torch's Module._apply cannot swap them in there); its buffers move anywhere
        self.register_buffer("w", torch.ones(3))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.w


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_inception_is_loaded_onto_the_device_asked_for(tmp_path):
    path = tmp_path / "weighted_inception.pt"
    torch.jit.save(torch.jit.script(_WithWeight()), str(path))
    inc = load_inception(path)  # default: the CPU, where the file is always read first (map_location)
    assert inc.device == torch.device("cpu") and inc.model.w.device.type == "cpu"
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    f = inc(images, batch_size=2)
    # on the CPU, what it always gave: the TF-scale input's channel means, float64 numpy
    expected = to_tf_inception_input(torch.from_numpy(images).permute(0, 3, 1, 2).float()).mean(dim=(2, 3))
    assert isinstance(f, np.ndarray) and f.dtype == np.float64
    assert np.array_equal(f, expected.double().numpy())
    # the meta device stands in for a GPU: the TorchScript module's weights move there
    on_meta = load_inception(path, device="meta")
    assert on_meta.device == torch.device("meta") and on_meta.model.w.device.type == "meta"
    assert inc.sha256 == on_meta.sha256 and inc.space == on_meta.space  # the same network, wherever it runs


class _SeesDevice(nn.Module):
    """Records the device of what it is given; answers zeros on the CPU (a meta tensor cannot come back)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, return_features: bool = False):
        self.seen.append(x.device.type)
        return torch.zeros(len(x), 2)


@pytest.mark.parametrize("kind", ["fid_inception_tf", "fid_inception_nvidia", "inception_v3_torchvision"])
def test_inception_preprocesses_and_runs_on_its_device(kind):
    """Every preprocessing (TF1 resize, torch resize and ImageNet scaling) happens where the network is: the
    old TF1 resize made its indices on the CPU and failed for images on any other device."""
    model = _SeesDevice()
    inc = InceptionFeatures(model, kind, "0" * 64, Path("fake.pt")).to("meta")
    f = inc(np.zeros((3, 8, 8), np.uint8), batch_size=2)
    assert model.seen == ["meta", "meta"] and f.shape == (3, 2) and f.dtype == np.float64


class _Stop(Exception):
    pass


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_the_evaluate_stage_loads_the_inception_onto_eval_device(make_cfg, monkeypatch, tmp_path):
    from ddm.eval.run import feature_spaces
    from ddm.stages import evaluate

    path = tmp_path / "weighted_inception.pt"
    torch.jit.save(torch.jit.script(_WithWeight()), str(path))
    inc = feature_spaces.load_inception(make_cfg(f"eval.inception_weights={path}").eval, device="meta")
    assert inc.model.w.device.type == "meta"

    asked = []

    def record(ec, device=None):
        asked.append(device)
        raise _Stop  # the stage's first slow step: nothing after it is needed here

    monkeypatch.setattr(evaluate, "load_inception", record)
    with pytest.raises(_Stop):
        evaluate.run(make_cfg("eval.device=meta"))
    assert asked == [torch.device("meta")]


def test_tf1_bilinear_resize_has_no_half_pixel_offset():
    # Output pixel j reads input coordinate j * in / out: 2 -> 4 px samples 0, 0.5, 1, 1.5 (the last clamped to 1).
    x = torch.tensor([[0.0, 100.0], [200.0, 40.0]]).view(1, 1, 2, 2)
    expected = [[0, 50, 100, 100], [100, 85, 70, 70], [200, 120, 40, 40], [200, 120, 40, 40]]
    assert resize_bilinear_tf1(x, 4)[0, 0].tolist() == expected
    big = torch.arange(3 * 16.0).view(1, 3, 4, 4)
    assert torch.equal(resize_bilinear_tf1(big, 2), big[:, :, ::2, ::2])  # 4 -> 2 px: input pixels 0 and 2
    same = torch.rand(2, 3, 299, 299) * 255
    assert torch.equal(resize_bilinear_tf1(same), same)


# --------------------------------------------------------------------------- the real FID Inception (make test)

DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


@pytest.fixture(scope="module")
def real_inception():
    return load_inception(REAL_INCEPTION)


@needs_real_inception
def test_the_real_fid_inception_gives_2048_pooled_relu_features(real_inception):
    inc = real_inception
    assert inc.kind == "fid_inception_tf" and inc.sha256 == DEFAULT_1_SHA256
    assert inc.space == "inception:7ff4a85c3a63"
    images = digits(0, 3)
    f = inc(images)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert f.min() >= 0 and f.max() > 0  # average pool after a ReLU
    assert not np.allclose(f[0], f[1])
    # the same again in batches of 2: deterministic, and batches are concatenated in order
    np.testing.assert_allclose(inc(images, batch_size=2), f, rtol=1e-5, atol=1e-6)


@needs_real_inception
def test_real_inception_input_is_the_module_called_by_hand(real_inception):
    """299 px RGB images given to the module in its documented range (x / 128 - 1, channels first, RGB order)."""
    inc = real_inception
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(2, 299, 299, 3), dtype=np.uint8)
    rgb[0, :100] = [255, 0, 0]  # a red band and a blue band: the channel order matters
    rgb[1, :100] = [0, 0, 255]
    rgb[:, -5:] = 255  # the top of the range: x / 128 - 1 = 1 - 1/128
    by_hand = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 128 - 1
    with torch.no_grad():
        expected = inc.model(by_hand).double().numpy()
        swapped = inc.model(by_hand[:1].flip(1)).double().numpy()  # the first image as BGR
    np.testing.assert_allclose(inc(rgb), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(swapped - expected[:1]).max() > 0.1  # so the check above would see swapped channels
    gray = digits(0, 2)
    np.testing.assert_allclose(inc(gray), inc(np.repeat(gray[..., None], 3, axis=-1)), rtol=1e-6, atol=1e-6)


@needs_real_inception
def test_real_inception_fid_is_zero_for_a_set_and_large_against_noise(real_inception):
    a, b = real_inception(digits(0, 12)), real_inception(digits(12, 12))
    noise = real_inception(np.random.default_rng(0).integers(0, 256, size=(12, 8, 8), dtype=np.uint8))
    # Each FD in 2048 dimensions takes seconds on 2 cores: three of them.
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-6)
    same_kind = frechet_distance_features(a, b)
    assert same_kind > 1  # other digits, few images: not zero
    assert frechet_distance_features(a, noise) > 2 * same_kind
