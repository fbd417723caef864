"""Ensemble routing: sparse execution must equal "evaluate every expert, then select and weight".

The reference below runs every expert on the full batch and combines the
results with weights computed independently from the router's softmax; the
Ensemble must agree while calling each selected expert once, on exactly its
samples. Analytic experts in float64 make the comparison exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble, experts_per_sample, select_experts
from ddm.errors import BadInput
from ddm.flow import FlowPath
from ddm.models.conditioning import TextCondition
from ddm.models.dit import DiT, DiTClassifier
from ddm.sampling import sample

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


def guided_by_hand(expert, x, t, y, scale):
    """Classifier-free guidance written out, not the code under test's: the expert at the null input and at y,
    then ``v_uncond + scale * (v_cond - v_uncond)``."""
    null = y.as_null() if isinstance(y, TextCondition) else torch.full_like(y, C)
    v_uncond, v_cond = expert(x, t, null), expert(x, t, y)
    return v_uncond + scale * (v_cond - v_uncond)


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
    torch.testing.assert_close(ens.forward_with_cfg(x, t, y, 2.5), guided_by_hand(ex[1], x, t, y, 2.5), rtol=0, atol=0)


def test_cfg_keeps_the_cond_and_uncond_pair_on_one_expert():
    """Routing on the conditional input: the null label would route elsewhere, but must not."""
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    chosen = router(x, t, y).argmax(1)
    assert (chosen != router(x, t, None).argmax(1)).any(), "test needs labels that change the routing"
    want = torch.stack(
        [guided_by_hand(ex[k], x[i : i + 1], t[i : i + 1], y[i : i + 1], 3.0)[0] for i, k in enumerate(chosen.tolist())]
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


# ---- threshold and nucleus: data-dependent sets of experts ----------------------------------------
def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_threshold_selects_every_expert_at_or_above_it_and_always_the_top_one():
    probs = _rows([0.5, 0.25, 0.125, 0.125], [0.375, 0.375, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5])
    cases = {
        # threshold: (selected rows, weights rows); every probability is a binary fraction, so exact
        0.125: ([[1, 1, 1, 1]] * 3, probs.tolist()),
        0.25: (
            [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]],
            [[2 / 3, 1 / 3, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1 / 3, 2 / 3]],
        ),
        0.375: ([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1]]),
        # above every probability: the most probable expert alone (the first of equal maxima)
        0.9: ([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]),
    }
    for threshold, (want_selected, want_weights) in cases.items():
        selected, weights = select_experts(probs, "threshold", threshold=threshold)
        assert selected.tolist() == [[bool(v) for v in r] for r in want_selected], threshold
        assert torch.equal(weights, _rows(*want_weights)), threshold


def test_nucleus_is_the_smallest_set_whose_probabilities_reach_top_p():
    probs = _rows([0.125, 0.5, 0.125, 0.25])
    cases = {
        0.5: ([0, 1, 0, 0], [0, 1, 0, 0]),  # the top expert holds exactly 0.5
        0.6: ([0, 1, 0, 1], [0, 2 / 3, 0, 1 / 3]),
        0.75: ([0, 1, 0, 1], [0, 2 / 3, 0, 1 / 3]),
        # 0.875 needs a third: experts 0 and 2 tie at 0.125, the lower id goes first
        0.8: ([1, 1, 0, 1], [1 / 7, 4 / 7, 0, 2 / 7]),
        0.9: ([1, 1, 1, 1], probs[0].tolist()),
        1.0: ([1, 1, 1, 1], probs[0].tolist()),
        1e-9: ([0, 1, 0, 0], [0, 1, 0, 0]),  # tiny: top-1
    }
    for top_p, (want_selected, want_weights) in cases.items():
        selected, weights = select_experts(probs, "nucleus", top_p=top_p)
        assert selected[0].tolist() == [bool(v) for v in want_selected], top_p
        torch.testing.assert_close(weights, _rows(want_weights), rtol=0, atol=1e-15, msg=f"top_p={top_p}")
    # top_p = 1: every expert of nonzero probability, and only those
    selected, weights = select_experts(_rows([0.5, 0.0, 0.5, 0.0]), "nucleus", top_p=1.0)
    assert selected.tolist() == [[True, False, True, False]] and weights.tolist() == [[0.5, 0.0, 0.5, 0.0]]
    # ties broken by expert id, whatever the position of the tie
    uniform = _rows([0.25] * 4)
    assert select_experts(uniform, "nucleus", top_p=1e-9)[0].tolist() == [[True, False, False, False]]
    assert select_experts(uniform, "nucleus", top_p=0.5)[0].tolist() == [[True, True, False, False]]
    assert select_experts(uniform, "nucleus", top_p=0.51)[0].tolist() == [[True, True, True, False]]


def _reference_set(p: list[float], strategy: str, threshold: float, top_p: float) -> list[int]:
    """The definitions, one row at a time in plain Python."""
    if strategy == "threshold":
        best = max(range(len(p)), key=lambda k: (p[k], -k))
        return sorted({best} | {k for k in range(len(p)) if p[k] >= threshold})
    ranked = sorted(range(len(p)), key=lambda k: (-p[k], k))
    chosen, mass = [], 0.0
    for k in ranked:
        if mass >= top_p or p[k] == 0:
            break
        chosen.append(k)
        mass += p[k]
    return sorted(chosen)


def reference_dynamic(ex, router, x, t, y, strategy, threshold=0.1, top_p=0.9):
    probs = router(x, t, y).softmax(-1)
    w = torch.zeros_like(probs)
    for i, row in enumerate(probs.tolist()):
        chosen = _reference_set(row, strategy, threshold, top_p)
        w[i, chosen] = probs[i, chosen] / probs[i, chosen].sum()
    dense = torch.stack([ex[k](x, t, y) for k in range(K)], dim=1)
    return (w[..., None] * dense).sum(1), w > 0


@pytest.mark.parametrize("strategy,threshold,top_p", [("threshold", 0.15, 0.9), ("nucleus", 0.1, 0.8)])
def test_threshold_and_nucleus_sparse_equal_dense_and_run_each_expert_once(strategy, threshold, top_p):
    spies, router = experts(spy=True), LinearRouter()
    x, t, y = batch()
    want, want_selected = reference_dynamic(spies, router, x, t, y, strategy, threshold, top_p)
    sizes = want_selected.sum(1)
    assert sizes.min() == 1 and sizes.max() > 1, "the test needs rows of one expert and rows of several"
    for spy in spies:
        spy.calls = []
    ens = Ensemble(spies, router, strategy=strategy, threshold=threshold, top_p=top_p)
    got = ens(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    selected, weights = ens.route(x, t, y)
    assert torch.equal(selected, want_selected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, dtype=torch.float64))
    for k, spy in enumerate(spies):
        routed = selected[:, k].nonzero().squeeze(1).tolist()
        assert spy.calls == ([routed] if routed else []), f"expert {k}"
    # usage: the samples each expert ran on, so the mean experts per sample is measured
    (record,) = ens.usage
    assert record["counts"] == selected.sum(0).tolist()
    assert experts_per_sample(ens.usage, B) == pytest.approx(sizes.double().mean().item())


def test_threshold_zero_is_the_full_ensemble_and_nucleus_one_its_nonzero_part():
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    full = Ensemble(ex, router, strategy="full")
    zero = Ensemble(ex, router, strategy="threshold", threshold=0.0)
    assert torch.equal(zero(x, t, y), full(x, t, y))
    assert zero.usage == full.usage
    nucleus = Ensemble(ex, router, strategy="nucleus", top_p=1.0)
    torch.testing.assert_close(nucleus(x, t, y), full(x, t, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(threshold=1.5), "sample.threshold"),
        (dict(threshold=-0.1), "sample.threshold"),
        (dict(threshold=float("nan")), "sample.threshold"),
        (dict(threshold="high"), "sample.threshold"),
        (dict(top_p=0.0), "sample.top_p"),
        (dict(top_p=1.01), "sample.top_p"),
        (dict(top_p=None), "sample.top_p"),
        (dict(cfg_routing="both"), "sample.cfg_routing"),
    ],
)
def test_bad_routing_options_are_errors_naming_the_key(kwargs, key):
    with pytest.raises(BadInput, match=key):
        Ensemble(experts(), LinearRouter(), strategy="threshold", **kwargs)


def test_routing_options_at_their_bounds_are_accepted():
    """Each bound is kept as given and does what it says: threshold 0 and top_p 1 keep every expert (all have a
    nonzero probability here: the full ensemble), threshold 1 and a tiny top_p the most probable one alone (top1)."""
    router, (x, t, y) = LinearRouter(), batch()
    full = Ensemble(experts(), router, strategy="full")(x, t, y)
    top1 = Ensemble(experts(), router, strategy="top1")(x, t, y)
    for strategy, key, value, want in (
        ("threshold", "threshold", 0.0, full),
        ("threshold", "threshold", 1.0, top1),
        ("nucleus", "top_p", 1.0, full),
        ("nucleus", "top_p", 1e-6, top1),
    ):
        ens = Ensemble(experts(), router, strategy=strategy, **{key: value})
        assert getattr(ens, key) == value
        torch.testing.assert_close(ens(x, t, y), want, rtol=1e-12, atol=1e-12, msg=f"{key}={value}")


# ---- guidance: the null input routed with the conditional one, or on its own ----------------------
class NullAwareRouter(nn.Module):
    """Labels go to expert ``y % 3``; the null label (C) to expert 3: the two halves of guidance disagree."""

    num_outputs = K

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        target = torch.where(y == C, torch.full_like(y, 3), y % 3)
        return 20.0 * nn.functional.one_hot(target, K).to(x.dtype)


def test_shared_cfg_routing_is_unchanged_bit_for_bit():
    """``shared`` (the default) guides each expert's own samples, exactly as the sparse loop always did."""
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    for strategy in ("top1", "topk"):
        ens = Ensemble(ex, router, strategy=strategy, top_k=2)
        assert ens.cfg_routing == "shared"
        selected, weights = ens.route(x, t, y)
        want = torch.zeros_like(x)
        for k in range(K):
            idx = selected[:, k].nonzero().squeeze(1)
            v = guided_by_hand(ex[k], x[idx], t[idx], y[idx], 2.5)
            want.index_add_(0, idx, v * weights[idx, k : k + 1] if strategy == "topk" else v)
        got = ens.forward_with_cfg(x, t, y, 2.5)
        assert torch.equal(got, want)
        shared = Ensemble(ex, router, strategy=strategy, top_k=2, cfg_routing="shared")
        assert torch.equal(shared.forward_with_cfg(x, t, y, 2.5), got)


def test_separate_cfg_routing_takes_the_unconditional_velocity_from_the_null_inputs_expert():
    spies, router = experts(spy=True), NullAwareRouter()
    x, t, y = batch()
    null = torch.full_like(y, C)
    scale = 2.5
    got = Ensemble(spies, router, strategy="top1", cfg_routing="separate").forward_with_cfg(x, t, y, scale)
    ex = [s.inner for s in spies]
    # by hand: the conditional velocity from expert y % 3, the unconditional one from expert 3
    v_cond = torch.stack([ex[int(c) % 3](x[i : i + 1], t[i : i + 1], y[i : i + 1])[0] for i, c in enumerate(y)])
    v_uncond = ex[3](x, t, null)
    torch.testing.assert_close(got, v_uncond + scale * (v_cond - v_uncond), rtol=1e-12, atol=1e-12)
    # each expert ran once, unguided: experts 0-2 on the conditional rows of their labels, 3 on every null row
    for k in range(3):
        assert spies[k].calls == [(y % 3 == k).nonzero().squeeze(1).tolist()]
    assert spies[3].calls == [list(range(B))]
    # shared routing keeps both halves on expert y % 3: a different velocity
    shared = Ensemble(ex, router, strategy="top1").forward_with_cfg(x, t, y, scale)
    want_shared = torch.stack(
        [guided_by_hand(ex[int(c) % 3], x[i : i + 1], t[i : i + 1], y[i : i + 1], scale)[0] for i, c in enumerate(y)]
    )
    torch.testing.assert_close(shared, want_shared, rtol=1e-12, atol=1e-12)
    assert (shared - got).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["topk", "full", "threshold", "nucleus"])
def test_separate_cfg_routing_weights_each_half_by_its_own_routing(strategy):
    """v = v_uncond + s (v_cond - v_uncond), each the dense reference under the router's view of its input."""
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    null = torch.full_like(y, C)

    def dense(labels):
        if strategy in ("threshold", "nucleus"):
            return reference_dynamic(ex, router, x, t, labels, strategy, 0.15, 0.8)[0]
        return reference(dict(enumerate(ex)), router, x, t, labels, strategy, top_k=2)

    ens = Ensemble(ex, router, strategy=strategy, top_k=2, threshold=0.15, top_p=0.8, cfg_routing="separate")
    got = ens.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(got, dense(null) + 3.0 * (dense(y) - dense(null)), rtol=1e-11, atol=1e-11)
    (record,) = ens.usage
    assert record["counts"] == ens.route(x, t, y)[0].sum(0).tolist()
    assert record["uncond_counts"] == ens.route(x, t, null)[0].sum(0).tolist()
    assert sum(record["uncond_weights"]) == pytest.approx(1.0)


def test_separate_cfg_routing_without_guidance_is_the_plain_ensemble():
    ex, router = experts(), LinearRouter()
    x, t, y = batch()
    sep = Ensemble(ex, router, strategy="topk", cfg_routing="separate")
    plain = Ensemble(ex, router, strategy="topk")
    assert torch.equal(sep.forward_with_cfg(x, t, y, 1.0), plain(x, t, y))
    assert torch.equal(sep(x, t, y), plain(x, t, y))
    assert "uncond_counts" not in sep.usage[-1]


class TextExpert(nn.Module):
    """v = a x + pooled-caption term, or its own null vector for captions flagged null."""

    num_classes = 0

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.w, self.null = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(3))

    def forward(self, x, t, y):
        caption = y.pooled.sum(-1, keepdim=True) * self.w
        return self.a * x + torch.where(y.null[:, None], self.null, caption)


class NullTextRouter(nn.Module):
    """Captions to expert 0, null captions to expert 1."""

    num_outputs = 2

    def forward(self, x, t, y):
        return 20.0 * nn.functional.one_hot(y.null.long(), 2).to(x.dtype)


def test_separate_cfg_routing_with_text_conditions():
    ex, router = [TextExpert(1), TextExpert(2)], NullTextRouter()
    g = torch.Generator().manual_seed(0)
    n = 6
    x, t = torch.randn(n, D, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    y = TextCondition.of(
        torch.randn(n, 3, 4, generator=g, dtype=torch.float64),
        torch.ones(n, 3, dtype=torch.bool),
        torch.randn(n, 4, generator=g, dtype=torch.float64),
    )
    got = Ensemble(ex, router, strategy="top1", cfg_routing="separate").forward_with_cfg(x, t, y, 2.0)
    v_cond, v_uncond = ex[0](x, t, y), ex[1](x, t, y.as_null())
    torch.testing.assert_close(got, v_uncond + 2.0 * (v_cond - v_uncond), rtol=1e-12, atol=1e-12)
    shared = Ensemble(ex, router, strategy="top1").forward_with_cfg(x, t, y, 2.0)
    torch.testing.assert_close(shared, guided_by_hand(ex[0], x, t, y, 2.0), rtol=1e-12, atol=1e-12)


def test_separate_cfg_routing_needs_a_conditional_model():
    ex = experts()
    for e in ex:
        e.num_classes = 0
    ens = Ensemble(ex, LinearRouter(), strategy="top1", cfg_routing="separate")
    x, t, y = batch()
    with pytest.raises(BadInput, match="needs a conditional model"):
        ens.forward_with_cfg(x, t, y, 2.0)


# ---- guidance against numbers worked out by hand ------------------------------------------------
class ConstantExpert(nn.Module):
    """v = ``cond`` everywhere for a real label (or a caption), ``uncond`` for the null label C (or null text)."""

    num_classes = C

    def __init__(self, cond: float, uncond: float):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, x, t, y=None):
        if y is None:
            null = torch.ones(x.shape[0], dtype=torch.bool)
        else:
            null = y.null if isinstance(y, TextCondition) else y == C
        return torch.where(null[:, None], torch.full_like(x, self.uncond), torch.full_like(x, self.cond))


class ParityRouter(nn.Module):
    """Label y to expert y % 2, the null label C to expert 1."""

    num_outputs = 2

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), C, dtype=torch.long) if y is None else y
        return 30.0 * nn.functional.one_hot(torch.where(y == C, 1, y % 2), 2).to(x.dtype)


def constant_experts():
    # expert 0: v_cond 2, v_uncond 0.5, guided 0.5 + 1.5 s; expert 1: v_cond -1, v_uncond 3, guided 3 - 4 s
    return [ConstantExpert(2.0, 0.5), ConstantExpert(-1.0, 3.0)]


# scale s -> guided v, by hand. top1 with ParityRouter, labels 0 and 1:
#   shared:   label 0 -> expert 0 guided, 0.5 + 1.5 s;   label 1 -> expert 1 guided, 3 - 4 s
#   separate: label 0 -> v_cond 2 of expert 0 and v_uncond 3 of expert 1 (the null's), 3 + s (2 - 3) = 3 - s;
#             label 1 -> expert 1 for both halves, 3 - 4 s
# full with router weights (1/4, 3/4), shared or separate alike: v_cond = 2/4 - 3/4 = -0.25,
#   v_uncond = 0.5/4 + 9/4 = 2.375, guided 2.375 + s (-0.25 - 2.375) = 2.375 - 2.625 s
# s = 1 is no guidance: v_cond of the routed experts; s = 0 is v_uncond alone.
BY_HAND = {
    # s: (shared label 0, shared label 1, separate label 0, separate label 1, full)
    0.0: (0.5, 3.0, 3.0, 3.0, 2.375),
    1.0: (2.0, -1.0, 2.0, -1.0, -0.25),
    2.0: (3.5, -5.0, 1.0, -5.0, -2.875),
    4.0: (6.5, -13.0, -1.0, -13.0, -8.125),
    -0.5: (-0.25, 5.0, 3.5, 5.0, 3.6875),
}


@pytest.mark.parametrize("scale", sorted(BY_HAND))
def test_guided_ensemble_velocity_equals_the_hand_worked_value(scale):
    """``v_uncond + s (v_cond - v_uncond)``: the sign and the scale, for each routing of the null input."""
    x = torch.zeros(4, D, dtype=torch.float64)  # the experts' velocities do not depend on x or t
    t = torch.full((4,), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    shared0, shared1, sep0, sep1, full = BY_HAND[scale]

    def want(a, b):  # rows of labels 0, 1, 1, 0
        return torch.tensor([a, b, b, a], dtype=torch.float64)[:, None].expand(4, D)

    for cfg_routing, (a, b) in (("shared", (shared0, shared1)), ("separate", (sep0, sep1))):
        ens = Ensemble(constant_experts(), ParityRouter(), strategy="top1", cfg_routing=cfg_routing)
        torch.testing.assert_close(ens.forward_with_cfg(x, t, y, scale), want(a, b), rtol=0, atol=1e-14)
    for cfg_routing in ("shared", "separate"):
        ens = Ensemble(
            constant_experts(),
            ConstantRouter([math.log(0.25), math.log(0.75)]),
            strategy="full",
            cfg_routing=cfg_routing,
        )
        torch.testing.assert_close(ens.forward_with_cfg(x, t, y, scale), want(full, full), rtol=0, atol=1e-14)
        # text: the null input is the captions flagged null
        text = TextCondition.of(torch.zeros(4, 3, 2), torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 2))
        torch.testing.assert_close(ens.forward_with_cfg(x, t, text, scale), want(full, full), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cfg_routing", ["shared", "separate"])
def test_sampling_a_guided_ensemble_integrates_the_hand_worked_velocity(cfg_routing):
    """A constant velocity v over t from 1 to 0 moves x by -v: the sampler passes the scale on, unchanged."""
    ens = Ensemble(constant_experts(), ParityRouter(), strategy="top1", cfg_routing=cfg_routing)
    y = torch.tensor([0, 1])
    x1 = torch.zeros(2, D, dtype=torch.float64)
    x0 = sample(ens, FlowPath(), x1.shape, y=y, steps=3, cfg_scale=2.0, x_init=x1)
    shared0, shared1, sep0, sep1, _ = BY_HAND[2.0]
    want = (shared0, shared1) if cfg_routing == "shared" else (sep0, sep1)
    torch.testing.assert_close(x0, -torch.tensor(want, dtype=torch.float64)[:, None].expand(2, D), rtol=0, atol=1e-14)
