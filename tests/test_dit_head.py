"""The DiT's output head: the linear head per patch, and the conv head that lets neighbouring patches meet."""

from __future__ import annotations

import pytest
import torch

from ddm.errors import BadInput
from ddm.models.dit import DiT


def _net(conv_head: int) -> DiT:
    torch.manual_seed(0)
    return DiT("DiT-N/4", image_size=8, in_channels=1, num_classes=3, conv_head=conv_head)


def _inputs(n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.tensor([0, 2][:n])


@pytest.mark.parametrize("conv_head", [0, 8])
def test_both_heads_start_at_zero_and_learn(conv_head):
    net = _net(conv_head)
    x, t, y = _inputs()
    assert net(x, t, y).shape == x.shape and torch.count_nonzero(net(x, t, y)) == 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = (net(x, t, y) - torch.ones_like(x)).pow(2).mean()
    loss.backward()
    opt.step()
    assert (net(x, t, y) - torch.ones_like(x)).pow(2).mean() < loss  # not a dead head at init


def _border_change(conv_head: int) -> tuple[float, float]:
    """Perturb only patch (0, 0)'s decoded features; return the output change in that patch and in its right
    neighbour's first column (the pixels across the border)."""
    net = _net(conv_head)
    for p in net.parameters():  # a trained-looking net: no zero layer hides the dependence
        torch.nn.init.normal_(p, std=0.3)
    x, t, y = _inputs(1)
    with torch.no_grad():
        return _change_of_patch_00(net, x, t, y)


def _change_of_patch_00(net: DiT, x, t, y) -> tuple[float, float]:
    base = net(x, t, y)
    per_token = net.final.out_features

    def bump(_module, _inputs, out):
        out = out.clone()
        out[:, 0, :per_token] += 1.0  # token 0 is patch (row 0, column 0)
        return out

    handle = net.final.register_forward_hook(bump)
    changed = (net(x, t, y) - base).abs()[0, 0]
    handle.remove()
    return float(changed[:4, :4].sum()), float(changed[:4, 4].sum())


def test_the_linear_head_keeps_each_patch_to_itself_and_the_conv_head_crosses_the_border():
    own, across = _border_change(0)
    assert own > 0 and across == 0
    own, across = _border_change(8)
    assert own > 0 and across > 0


def test_the_config_rebuilds_the_same_network():
    net = _net(8)
    assert net.config()["conv_head"] == 8 and "conv_head" not in _net(0).config()
    again = DiT(**net.config())
    again.load_state_dict(net.state_dict())
    x, t, y = _inputs()
    torch.testing.assert_close(again(x, t, y), net(x, t, y))


def test_a_negative_conv_head_is_refused():
    with pytest.raises(BadInput, match="model.conv_head=-1"):
        _net(-1)
