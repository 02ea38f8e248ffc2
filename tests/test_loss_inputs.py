"""Rough inputs to the losses get clear errors (issue #30, item 8)."""

from __future__ import annotations

import pytest
import torch

import torchgloro as tg
from torchgloro.losses import GloroCrossEntropy, GloroEMMA, GloroHinge, GloroTrades


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3)


def _losses(net):
    return [GloroCrossEntropy(), GloroTrades(), GloroHinge(), GloroEMMA().bind(net)]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.zeros(4, 1, dtype=torch.long), r"shape \(4, 1\).*one label per"),
        (torch.zeros(3, dtype=torch.long), r"4 rows.*shape \(3,\)"),
    ],
)
def test_labels_of_the_wrong_shape_are_a_clear_error(net, index, labels, match):
    """Labels shaped (B, 1), or of the wrong length, gave raw torch errors."""
    logits = net.train()(torch.rand(4, 1, 8, 8))
    with pytest.raises(tg.GloroInputError, match=match):
        _losses(net)[index](logits, labels)


@pytest.mark.parametrize("index", range(4))
def test_an_empty_batch_is_a_clear_error(net, index):
    """An empty batch returned NaN."""
    logits = net.train()(torch.rand(0, 1, 8, 8))
    with pytest.raises(tg.GloroInputError, match="empty batch"):
        _losses(net)[index](logits, torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("loss", [GloroCrossEntropy(), GloroTrades(), GloroHinge()])
def test_class_logits_in_place_of_gloro_logits_are_caught(net, loss):
    """``loss(net.backbone(x), y)`` with every label below C − 1 treated the last class as ⊥
    silently. GloRo logits always have ⊥ ≥ the second-largest class logit."""
    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 9, (64,))
    loss(net.train()(x), y)  # the (B, C+1) logits pass
    with pytest.raises(tg.GloroInputError, match=r"net\.backbone\(x\)"):
        loss(net.backbone(x), y)
