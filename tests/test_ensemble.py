"""Ensemble routing: sparse execution must equal "evaluate every expert, then select and weight".

The reference below runs every expert on the full batch and combines the
results with weights computed independently from the router's softmax; the
Ensemble must agree while calling each selected expert once, on exactly its
samples. Analytic experts in float64 make the comparison exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.velocity import guided

K, C, B, D = 4, 3, 64, 5  # experts, classes, batch, feature size


class AffineExpert(nn.Module):
    """v = a * x + b + t c + e[y]: distinct per expert, depends on x, t and the label (null = C)."""

    num_classes = C

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b, self.c = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(3))
        self.e = torch.randn(C + 1, D, generator=g, dtype=torch.float64)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        return self.a * x + self.b + t[:, None] * self.c + self.e[y]


class Spy(nn.Module):
    """Wraps an expert and records the sample ids (x[:, 0]) of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def num_classes(self):
        return self.inner.num_classes

    def forward(self, x, t, y=None):
        self.calls.append(x[:, 0].round().long().tolist())
        return self.inner(x, t, y)


class LinearRouter(nn.Module):
    """Logits that depend on x, t and y, so routing differs between samples and labels."""

    def __init__(self, seed: int = 0, bias=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_outputs = K
        self.w = torch.randn(D, K, generator=g, dtype=torch.float64)
        self.u = torch.randn(K, generator=g, dtype=torch.float64)
        self.e = 2 * torch.randn(C + 1, K, generator=g, dtype=torch.float64)
        self.bias = torch.zeros(K, dtype=torch.float64) if bias is None else torch.tensor(bias, dtype=torch.float64)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        return x[:, 1:] @ self.w[1:] + t[:, None] * self.u + self.e[y] + self.bias


class ConstantRouter(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float64)
        self.num_outputs = len(logits)

    def forward(self, x, t, y=None):
        return self.logits.expand(x.shape[0], -1)


def batch(seed=1, n=B):
    """x whose first coordinate is the sample's id (so spies can tell samples apart)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x[:, 0] = torch.arange(n, dtype=torch.float64)
    return x, torch.rand(n, generator=g, dtype=torch.float64), torch.randint(C, (n,), generator=g)


def experts(spy=False):
    made = [AffineExpert(seed=10 + k) for k in range(K)]
    return [Spy(e) for e in made] if spy else made


def reference(experts_by_id, router, x, t, y, strategy, top_k=2, subset=None):
    """Dense: every expert on the full batch, then weights chosen from the softmax over the subset."""
    ids = list(range(K)) if subset is None else sorted(subset)
    probs = router(x, t, y)[:, ids].softmax(-1)
    dense = torch.stack([experts_by_id[k](x, t, y) for k in ids], dim=1)  # [B, n, D]
    if strategy == "full":
        w = probs
    else:
        kk = 1 if strategy == "top1" else top_k
        top = probs.topk(kk, dim=-1)
        w = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        w = w / w.sum(-1, keepdim=True)
    return (w[..., None] * dense).sum(1)


@pytest.mark.parametrize("strategy,top_k", [("top1", 1), ("topk", 2), ("topk", 3), ("full", K)])
def test_sparse_equals_dense_then_select(strategy, top_k):
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    ens = Ensemble(ex, router, strategy=strategy, top_k=top_k)
    want = reference(dict(enumerate(ex)), router, x, t, y, strategy, top_k)
    got = ens(x, t, y)
    if strategy == "top1":
        # one-hot: each sample's velocity is exactly its expert's
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_top1_picks_the_argmax_expert_per_sample():
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    choice = router(x, t, y).argmax(1)
    got = Ensemble(ex, router, strategy="top1")(x, t, y)
    for i in range(B):
        assert torch.equal(got[i], ex[choice[i]](x[i : i + 1], t[i : i + 1], y[i : i + 1])[0])


@pytest.mark.parametrize("strategy", ["top1", "topk", "full"])
@pytest.mark.parametrize("subset", [[0, 2, 3], [1, 3]])
def test_subset_renormalises_over_its_experts(strategy, subset):
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    available = {k: ex[k] for k in subset}  # the others were never trained: not given at all
    ens = Ensemble(available, router, strategy=strategy, top_k=2, subset=subset)
    want = reference(available, router, x, t, y, strategy, top_k=2, subset=subset)
    torch.testing.assert_close(ens(x, t, y), want, rtol=1e-12, atol=1e-12)
    selected, weights = ens.route(x, t, y)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, dtype=torch.float64))
    assert (weights[~selected] == 0).all() and selected.shape == (B, len(subset))


def test_missing_experts_need_a_subset():
    ex, router = experts(), LinearRouter()
    with pytest.raises(ValueError, match=r"experts \[1\] of 4 are missing.*subset"):
        Ensemble({0: ex[0], 2: ex[2], 3: ex[3]}, router)
    with pytest.raises(ValueError, match=r"subset names experts \[1\]"):
        Ensemble({0: ex[0], 2: ex[2]}, router, subset=[0, 1])
    with pytest.raises(ValueError, match="sample.top_k"):
        Ensemble({0: ex[0], 2: ex[2]}, router, strategy="topk", top_k=3, subset=[0, 2])
    with pytest.raises(ValueError, match="sample.strategy"):
        Ensemble(ex, router, strategy="best")


@pytest.mark.parametrize("strategy", ["top1", "topk", "sample"])
def test_each_selected_expert_runs_once_on_exactly_its_samples(strategy):
    spies = experts(spy=True)
    # expert 3 is never the most probable: under top1 it must not be called at all
    router = LinearRouter(bias=[0.0, 0.0, 0.0, -50.0])
    x, t, y = batch()
    ens = Ensemble(spies, router, strategy=strategy, top_k=2, generator=torch.Generator().manual_seed(0))
    selected, _ = ens.route(x, t, y)
    ens.generator.manual_seed(0)  # replay the same draws for the `sample` strategy
    ens(x, t, y)
    for k, spy in enumerate(spies):
        routed = selected[:, k].nonzero().squeeze(1).tolist()
        if not routed:
            assert spy.calls == [], f"expert {k} had no samples but was called"
        else:
            assert spy.calls == [routed], f"expert {k}: calls {spy.calls}, routed {routed}"
    if strategy == "top1":
        assert spies[3].calls == []


def test_sample_strategy_frequencies_match_router_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ens = Ensemble(
        experts(), ConstantRouter(probs.log().tolist()), strategy="sample", generator=torch.Generator().manual_seed(0)
    )
    x, t, y = batch(n=20000)
    ens(x, t, y)
    ens(x, t, y)  # a fresh draw at every call
    first, second = (torch.tensor(r["counts"], dtype=torch.float64) / 20000 for r in ens.usage)
    torch.testing.assert_close(first, probs, atol=0.012, rtol=0)
    torch.testing.assert_close(second, probs, atol=0.012, rtol=0)
    assert not torch.equal(first, second)


def test_sample_strategy_follows_each_samples_own_posterior():
    router = LinearRouter(seed=3)
    x, t, y = batch(n=8)
    x, t, y = x.repeat(4000, 1), t.repeat(4000), y.repeat(4000)
    ens = Ensemble(experts(), router, strategy="sample", generator=torch.Generator().manual_seed(1))
    selected, _ = ens.route(x, t, y)
    freq = selected.double().reshape(4000, 8, K).mean(0)
    torch.testing.assert_close(freq, router(x[:8], t[:8], y[:8]).softmax(-1), atol=0.03, rtol=0)


def test_cfg_with_a_constant_router_is_that_experts_guided_velocity():
    ex = experts()
    ens = Ensemble(ex, ConstantRouter([0.0, 3.0, 1.0, -1.0]), strategy="top1")
    x, t, y = batch()
    torch.testing.assert_close(ens.forward_with_cfg(x, t, y, 2.5), guided(ex[1], x, t, y, 2.5), rtol=0, atol=0)


def test_cfg_keeps_the_cond_and_uncond_pair_on_one_expert():
    """Routing on the conditional input: the null label would route elsewhere, but must not."""
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    chosen = router(x, t, y).argmax(1)
    assert (chosen != router(x, t, None).argmax(1)).any(), "test needs labels that change the routing"
    want = torch.stack(
        [guided(ex[k], x[i : i + 1], t[i : i + 1], y[i : i + 1], 3.0)[0] for i, k in enumerate(chosen.tolist())]
    )
    got = Ensemble(ex, router, strategy="top1").forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy,per_sample", [("top1", 1), ("sample", 1), ("topk", 2), ("full", K)])
def test_usage_records_one_entry_per_call(strategy, per_sample):
    ens = Ensemble(experts(), LinearRouter(), strategy=strategy, top_k=2, generator=torch.Generator().manual_seed(0))
    x, t, y = batch()
    for _ in range(3):
        ens(x, t, y)
    ens.forward_with_cfg(x, t, y, 2.0)
    assert len(ens.usage) == 4
    for rec in ens.usage:
        assert len(rec["counts"]) == K and sum(rec["counts"]) == per_sample * B
        assert sum(rec["weights"]) == pytest.approx(1.0)
        assert rec["t"] == pytest.approx(t.mean().item())
    ens.reset_usage()
    assert ens.usage == []


def test_usage_counts_use_expert_ids_under_a_subset():
    ex = experts()
    ens = Ensemble({1: ex[1], 3: ex[3]}, ConstantRouter([9.0, 0.0, 9.0, 1.0]), subset=[1, 3])
    x, t, y = batch()
    ens(x, t, y)
    assert ens.usage[-1]["counts"] == [0, 0, 0, B]


def test_experts_must_agree_on_num_classes():
    odd = AffineExpert(0)
    odd.num_classes = C + 1
    with pytest.raises(ValueError, match="num_classes"):
        Ensemble([*experts()[:3], odd], LinearRouter())
    assert Ensemble(experts(), LinearRouter()).num_classes == C


def _random_dit(seed, cls=DiT, **kw):
    torch.manual_seed(seed)
    net = cls(size="DiT-N/4", image_size=8, in_channels=1, num_classes=C, **kw)
    with torch.no_grad():  # DiT starts at zero output (adaLN-Zero); make it a real function
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def test_dit_experts_sparse_top1_and_topk_match_dense():
    # float64: sparse execution runs each expert on a sub-batch, and float32 matmuls of other batch
    # sizes round differently; in float64 any real difference in the maths stands far above rounding.
    dits = [_random_dit(k).double() for k in range(K)]
    router = _random_dit(99, DiTClassifier, num_outputs=K).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.rand(16, generator=g, dtype=torch.float64), torch.randint(C, (16,), generator=g)
    with torch.no_grad():
        assert len(set(router(x, t, y).argmax(1).tolist())) > 1, "routing should be mixed"
        for strategy in ("top1", "topk", "full"):
            probs = router(x, t, y).softmax(-1)
            dense = torch.stack([d(x, t, y) for d in dits], 1)
            if strategy == "full":
                w = probs
            else:
                top = probs.topk(1 if strategy == "top1" else 2, -1)
                w = torch.zeros_like(probs).scatter(1, top.indices, top.values)
                w = w / w.sum(-1, keepdim=True)
            want = (w[:, :, None, None, None] * dense).sum(1)
            got = Ensemble(dits, router, strategy=strategy)(x, t, y)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
