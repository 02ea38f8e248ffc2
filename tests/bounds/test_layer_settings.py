"""Layer settings the bounds and the round-off model assume are checked, not trusted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgloro as tg


def _padded_net(value: float) -> tg.GloroNet:
    """The issue #30 net: a padded constant that cancels inside the next convolution."""
    pad = nn.ZeroPad2d((1, 1, 0, 0))
    pad.value = value
    conv, head = nn.Conv2d(1, 1, (1, 3), bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0, -1.0]]]]))
        head.weight.copy_(torch.tensor([[1.0], [0.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5]))
    backbone = nn.Sequential(pad, conv, nn.Flatten(), head)
    return tg.GloroNet(backbone, epsilon=0.1, in_shape=(1, 1, 1))


@pytest.mark.parametrize("value", [1e20, 1.0, -3.0, float("nan")])
def test_zero_pad_with_a_nonzero_value_is_refused(value):
    """Issue #30, item 2: ``value=1e20`` was bounded as zero padding, and the padded constant
    cancelled with no round-off allowance: every mode certified the wrong class."""
    with pytest.raises(tg.UnsupportedLayerError, match=r"ZeroPad2d with value=.*value = 0"):
        _padded_net(value)


def test_zero_pad_with_value_zero_certifies_the_exact_class():
    """Logits (1, 0.5), margin 0.5 over a K ≥ 1: class 0 certified at ε = 0.1 in every mode."""
    net = _padded_net(0.0)
    x = torch.ones(1, 1, 1, 1)
    for kwargs in ({"precision": "auto"}, {"precision": "float64"}, {"fallback": "local"}):
        cert = net.certify(x, **kwargs)
        assert int(cert.pred[0]) == 0 and bool(cert.certified[0])
        assert 0.1 < float(cert.radius[0]) <= 0.5


def test_a_pad_value_changed_after_building_is_refused():
    net = _padded_net(0.0)
    net.backbone[0].value = 1e20
    with pytest.raises(tg.GloroInputError, match="value"):
        net.certify(torch.ones(1, 1, 1, 1))
