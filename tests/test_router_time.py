"""The router's own t distribution (``router.time_sampling``): uniform by default, whatever the experts' is."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.io import read_json, write_json
from ddm.stages import train_router
from tests.fabricate import make_partitions

EXPERTS_PATH = ("flow.time_sampling=logit_normal", "flow.schedule=cosine", "flow.t_eps=1e-3")


def _ks_to_uniform(path: FlowPath, n: int = 20000, seed: int = 0) -> float:
    """Kolmogorov-Smirnov distance of ``n`` draws of ``path.sample_t`` to U(0, 1)."""
    t = path.sample_t(n, generator=torch.Generator().manual_seed(seed)).sort().values.double()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - t, t - (i - 1) / n).max())


def test_the_router_draws_t_uniform_on_the_experts_path(make_cfg):
    flow = train_router.router_flow(make_cfg(*EXPERTS_PATH))
    # its own t distribution; the experts' schedule and t_eps: it noises as the sampler does
    assert flow["time_sampling"] == "uniform" and flow["schedule"] == "cosine" and flow["t_eps"] == 1e-3
    path = FlowPath(**flow)
    # 20000 draws: the KS distance of a uniform sample stays below 0.0138 (1.95 / sqrt(n)) with probability 0.999
    assert _ks_to_uniform(path) < 0.0138
    assert _ks_to_uniform(FlowPath(time_sampling="logit_normal")) > 0.05  # the check does tell the two apart
    # the experts' path is untouched, and the old behaviour stays one setting away
    assert make_cfg(*EXPERTS_PATH).flow.time_sampling == "logit_normal"
    asked = train_router.router_flow(
        make_cfg(*EXPERTS_PATH, "router.time_sampling=logit_normal", "router.logit_mean=0.5", "router.logit_std=2")
    )
    assert (asked["time_sampling"], asked["logit_mean"], asked["logit_std"]) == ("logit_normal", 0.5, 2.0)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 2.0), (-0.8, 0.5)])
def test_logit_normal_t_is_the_sigmoid_of_a_normal_of_that_mean_and_std(mean, std):
    """t = sigmoid(z), z ~ N(logit_mean, logit_std^2): its q-quantile is sigmoid(mean + std * Phi^-1(q)).

    200000 draws: the standard error of each quantile below is at most 1.3e-3 (at the median for std 2),
    of the mean of logit(t) std / 447, of its std std / 632; the tolerances are 4 or more of them.
    """
    n = 200_000
    path = FlowPath(time_sampling="logit_normal", logit_mean=mean, logit_std=std)
    t = path.sample_t(n, generator=torch.Generator().manual_seed(0)).double()
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        want = 1.0 / (1.0 + math.exp(-(mean + std * NormalDist().inv_cdf(q))))
        assert torch.quantile(t, q).item() == pytest.approx(want, abs=0.006), f"quantile {q}"
    z = torch.logit(t)  # back to the normal: its mean and std are the path's parameters
    assert z.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(n))
    assert z.std().item() == pytest.approx(std, rel=0.01)


def test_the_router_trains_on_its_time_sampling_and_records_it(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    seen = []
    original = train_router.RouterModule.training_step

    def spy(self, batch, idx):
        seen.append(self.path.config())
        return original(self, batch, idx)

    monkeypatch.setattr(train_router.RouterModule, "training_step", spy)
    record = train_router.run(fast_cfg(*EXPERTS_PATH, "router.steps=2", "router.eval_samples=20"))
    want = dict(schedule="cosine", time_sampling="uniform", logit_mean=0.0, logit_std=1.0, t_eps=1e-3)
    assert seen and all(s == want for s in seen)
    assert record["flow"] == want and read_json(rd.router_record)["flow"] == want
    assert torch.load(rd.router_weights, weights_only=False)["flow"] == want
    assert record["config"]["router"]["time_sampling"] == "uniform"


def test_an_unknown_router_time_sampling_is_refused_naming_the_key(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    with pytest.raises(BadInput, match=r"router.time_sampling='beta' is not one of \('uniform', 'logit_normal'\)"):
        train_router.run(fast_cfg("router.time_sampling=beta", "router.steps=2"))
    assert not rd.router.exists()


def test_a_finished_router_of_another_time_sampling_is_kept_and_named(fast_cfg, tmp_path, caplog):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    first = train_router.run(fast_cfg("router.steps=2", "router.eval_samples=20"))
    with caplog.at_level("WARNING", logger="ddm"):
        again = train_router.run(fast_cfg("router.steps=2", "router.time_sampling=logit_normal"))
    assert again == first
    assert "trained on t uniform, the config asks for logit_normal(mean=0.0, std=1.0)" in caplog.text
    assert "redo=true" in caplog.text

    # a router from before router.time_sampling: it trained on the run's flow, which its record's config keeps
    old = read_json(rd.router_record)
    del old["flow"]
    old["config"]["flow"]["time_sampling"] = "logit_normal"
    write_json(rd.router_record, old)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddm"):
        train_router.run(fast_cfg("router.steps=2"))
    assert "trained on t logit_normal(mean=0.0, std=1.0), the config asks for uniform" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddm"):
        train_router.run(fast_cfg("router.steps=2", "router.time_sampling=logit_normal"))
    assert "router.time_sampling" not in caplog.text


def test_a_checkpoint_of_another_time_sampling_is_not_resumed(fast_cfg, tmp_path, monkeypatch):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    original = train_router.RouterModule.training_step

    def crash_at_step_3(self, batch, idx):
        if self.global_step == 3:
            raise KeyboardInterrupt
        return original(self, batch, idx)

    monkeypatch.setattr(train_router.RouterModule, "training_step", crash_at_step_3)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_router.run(fast_cfg("router.steps=4", "router.ckpt_every=2", "router.time_sampling=logit_normal"))
    monkeypatch.setattr(train_router.RouterModule, "training_step", original)
    with pytest.raises(ValueError, match=r"time_sampling: checkpoint .*'logit_normal'.* vs now .*'uniform'"):
        train_router.run(fast_cfg("router.steps=4", "router.ckpt_every=2"))
    assert not rd.router_record.exists()
