"""A text-conditional DiT: it reads the caption, ignores padding, has a null text for guidance and dropout."""

from __future__ import annotations

import pytest
import torch

from ddm.ensemble import Ensemble
from ddm.errors import BadInput
from ddm.models.conditioning import TextCondition, cat_conditions
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.velocity import guided_velocity

D, L = 16, 6


def randomised(net):
    """Every weight random: at its zero init a DiT's output is 0 whatever the input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def text_model(**kw):
    return randomised(DiT("DiT-N/2", 8, 1, num_classes=0, text_dim=D, **kw))


def captions(b: int, lengths, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return TextCondition.of(torch.randn(b, L, D, generator=g), mask, torch.randn(b, D, generator=g))


def inputs(b: int):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 1, 8, 8, generator=g), torch.rand(b, generator=g)


def test_the_output_depends_on_the_caption():
    net = text_model()
    x, t = inputs(2)
    a, b = captions(2, [3, 3], seed=0), captions(2, [3, 3], seed=1)
    assert (net(x, t, a) - net(x, t, b)).abs().max() > 1e-3
    # the token embeddings alone matter too, not only the pooled one
    c = TextCondition.of(b.tokens, a.mask, a.pooled)
    assert (net(x, t, a) - net(x, t, c)).abs().max() > 1e-3


def test_padding_is_ignored():
    net = text_model()
    x, t = inputs(2)
    y = captions(2, [2, 4])
    noisy = y.tokens.clone()
    noisy[~y.mask] = 100.0  # whatever the padding holds
    torch.testing.assert_close(net(x, t, y), net(x, t, TextCondition.of(noisy, y.mask, y.pooled)))
    # more padding positions: the same output
    longer = TextCondition.of(
        torch.cat([y.tokens, torch.randn(2, 3, D)], 1),
        torch.cat([y.mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
        y.pooled,
    )
    torch.testing.assert_close(net(x, t, y), net(x, t, longer), rtol=1e-5, atol=1e-6)


def test_a_null_caption_is_the_learned_null_text_whatever_the_caption():
    net = text_model()
    x, t = inputs(2)
    a, b = captions(2, [3, 5], seed=0).as_null(), captions(2, [1, 2], seed=1).as_null()
    torch.testing.assert_close(net(x, t, a), net(x, t, b))
    dropped = captions(2, [3, 5]).dropped(torch.tensor([True, False]))
    assert dropped.null.tolist() == [True, False]
    torch.testing.assert_close(net(x, t, dropped)[:1], net(x, t, a)[:1])


def test_guidance_mixes_the_caption_and_the_null_text():
    # float64: guidance runs both branches as one batch of 6, and float32 kernels for a batch of 6 and of 3 may
    # round differently (5e-5 apart on some CPUs once x3 guidance amplifies it); the identity is what is tested
    net = text_model().double()
    x, t = (v.double() for v in inputs(3))
    c = captions(3, [2, 3, 4])
    y = TextCondition.of(c.tokens.double(), c.mask, c.pooled.double())
    v_c, v_u = net(x, t, y), net(x, t, y.as_null())
    torch.testing.assert_close(guided_velocity(net, x, t, y, 3.0), v_u + 3.0 * (v_c - v_u), rtol=1e-10, atol=1e-10)


def test_a_text_condition_acts_as_a_batch():
    y = captions(4, [1, 2, 3, 4])
    sub = y.index_select(0, torch.tensor([3, 1]))
    assert len(sub) == 2 and torch.equal(sub.mask, y.mask[[3, 1]]) and torch.equal(sub.pooled, y.pooled[[3, 1]])
    both = cat_conditions([y, y.as_null()])
    assert len(both) == 8 and both.null.tolist() == [False] * 4 + [True] * 4
    half = y.to(torch.float64)
    assert half.tokens.dtype == torch.float64 and half.mask.dtype == torch.bool
    with pytest.raises(BadInput, match="mask \\[B, L\\]"):
        TextCondition.of(y.tokens, y.mask[:, :2], y.pooled)


def test_wrong_conditioning_is_refused():
    x, t = inputs(1)
    with pytest.raises(BadInput, match="not both"):
        DiT("DiT-N/2", 8, 1, num_classes=10, text_dim=D)
    with pytest.raises(BadInput, match="must be a TextCondition"):
        text_model()(x, t, torch.zeros(1, dtype=torch.long))
    with pytest.raises(BadInput, match="must be class labels"):
        DiT("DiT-N/2", 8, 1, num_classes=10)(x, t, captions(1, [2]))
    with pytest.raises(BadInput, match="built for 16"):
        text_model()(
            x, t, TextCondition.of(torch.zeros(1, L, 8), torch.ones(1, L, dtype=torch.bool), torch.zeros(1, 8))
        )


def test_config_round_trip_and_old_configs():
    net = text_model()
    again = DiT(**net.config())
    assert again.text_dim == D and set(again.state_dict()) == set(net.state_dict())
    old = DiT("DiT-N/2", 8, 1, 10)
    assert "text_dim" not in old.config()  # what expert.pt files written before text support hold


def test_an_ensemble_of_text_experts_routes_captions_sample_by_sample():
    experts = [text_model(), randomised(DiT("DiT-N/2", 8, 1, num_classes=0, text_dim=D))]
    with torch.no_grad():
        for p in experts[1].parameters():
            p.add_(0.3)
    router = randomised(DiTClassifier(2, "DiT-N/2", 8, 1, num_classes=0, text_dim=D))
    x, t = inputs(6)
    y = captions(6, [1, 2, 3, 4, 5, 6])
    ens = Ensemble(experts, router, strategy="top1")
    chosen = router(x, t, y).argmax(1)
    assert 0 < int(chosen.sum()) < 6, "the test needs both experts used"
    want = torch.stack(
        [
            experts[int(k)](x[i : i + 1], t[i : i + 1], y.index_select(0, torch.tensor([i])))[0]
            for i, k in enumerate(chosen)
        ]
    )
    torch.testing.assert_close(ens(x, t, y), want, rtol=1e-3, atol=1e-4)  # batched vs one-by-one matmuls
    guided = ens.forward_with_cfg(x, t, y, 2.0)
    assert guided.shape == x.shape and torch.isfinite(guided).all()


def test_batches_keep_tokens_up_to_the_longest_caption():
    from ddm.models.conditioning import batch_text_length, cat_conditions

    assert [batch_text_length(n, 77) for n in (1, 7, 8, 9, 20, 76, 77)] == [8, 8, 8, 16, 24, 77, 77]
    assert batch_text_length(0, 77) == 8 and batch_text_length(5, 4) == 4  # never past the context
    net = text_model()
    x, t = inputs(3)
    y = captions(3, [2, 4, 3])
    padded = y.padded_to(y.tokens.shape[1] + 5)
    assert padded.tokens.shape[1] == y.tokens.shape[1] + 5 and not padded.mask[:, -5:].any()
    torch.testing.assert_close(net(x, t, y), net(x, t, padded), rtol=1e-5, atol=1e-6)
    short = TextCondition.of(y.tokens[:1, :2], y.mask[:1, :2], y.pooled[:1])  # 2 tokens kept of caption 0's 2
    both = cat_conditions([short, y[1:]])  # different lengths: padded to the longer one
    assert both.tokens.shape[1] == y.tokens.shape[1]
    torch.testing.assert_close(net(x, t, both), net(x, t, y), rtol=1e-5, atol=1e-6)
