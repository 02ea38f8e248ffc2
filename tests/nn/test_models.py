"""Every registered architecture: builds, wraps as a GloRo net, and respects its bound."""

from __future__ import annotations

import pytest
import torch

import torchgloro as tg

SHAPES = {
    "minicnn": (1, 8, 8),
    "2c2f": (1, 28, 28),
    "4c3f": (1, 28, 28),
    "6c2f": (3, 32, 32),
    "7c1f": (3, 32, 32),
}


@pytest.mark.parametrize("name", tg.list_models())
@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_every_model_builds_and_certifies(name, activation):
    shape = SHAPES.get(name, (3, 16, 16))
    num_classes = 200 if name == "7c1f" else 10
    f = tg.create_model(name, shape, num_classes, activation=activation)
    net = tg.GloroNet(f, epsilon=0.1, power_iterations=2)
    x = torch.rand(2, *shape)
    net.train()
    out = net(x)
    assert out.shape == (2, num_classes + 1)
    out.sum().backward()
    net.eval()
    c = net.certify(x, mode="fast")
    assert c.pred.shape == (2,) and c.radius.shape == (2,)
    if activation == "minmax":  # once per architecture: the deployed copy exports exactly
        d = tg.deploy(net, mode="fast")
        assert torch.equal(torch.export.export(d, (x,)).module()(x), net(x))


def test_paper_architectures_match_appendix_b():
    f = tg.create_model("2c2f", (1, 28, 28), 10)
    convs = [m for m in f if isinstance(m, torch.nn.Conv2d)]
    dense = [m for m in f if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (16, 4, 2),
        (32, 4, 2),
    ]
    assert [d.out_features for d in dense] == [100, 10]
    assert f(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    f = tg.create_model("4c3f", (1, 28, 28), 10)
    assert [m.out_features for m in f if isinstance(m, torch.nn.Linear)] == [512, 512, 10]
    f = tg.create_model("6c2f", (3, 32, 32), 10)
    assert len([m for m in f if isinstance(m, torch.nn.Conv2d)]) == 6
    f = tg.create_model("7c1f", (3, 64, 64), 200)
    assert [m.out_features for m in f if isinstance(m, torch.nn.Linear)] == [200]


@pytest.mark.parametrize("name", ["minicnn", "2c2f"])
def test_margin_lipschitz_property_on_random_pairs(name):
    """|Δ(f_j − f_i)| / ‖Δx‖ ≤ K_ji on random (and nearby) input pairs, for both bounds."""
    shape = SHAPES[name]
    net = tg.GloroNet(tg.create_model(name, shape, 10), 0.3).eval()
    K_sound = net.lipschitz_constant("sound").float()
    K_fast = net.lipschitz_constant("fast")
    x1 = torch.rand(256, *shape)
    x2 = torch.cat([torch.rand(128, *shape), x1[128:] + 1e-2 * torch.randn(128, *shape)])
    with torch.no_grad():
        y1, y2 = net.backbone(x1), net.backbone(x2)
    d = (x1 - x2).flatten(1).norm(dim=1)  # (N,)
    diff = y1 - y2  # (N, C)
    ratio = (diff[:, :, None] - diff[:, None, :]).abs() / d[:, None, None]  # (N, C, C)
    assert bool((ratio <= K_sound * (1 + 1e-5)).all())
    assert bool((ratio <= K_fast * (1 + 1e-4)).all())


def test_bad_model_arguments():
    with pytest.raises(tg.GloroInputError, match="Unknown model"):
        tg.create_model("resnet9000", (1, 28, 28), 10)
    with pytest.raises(tg.GloroInputError, match="activation"):
        tg.create_model("2c2f", (1, 28, 28), 10, activation="tanh")
    with pytest.raises(tg.GloroInputError, match="in_shape"):
        tg.create_model("2c2f", (28, 28), 10)


def test_channels_last_in_shape_is_refused_with_the_fix():
    """Found by a review: (28, 28, 1) built a 28-channel net that trained on width-1 images."""
    with pytest.raises(tg.GloroInputError, match=r"did you mean \(1, 28, 28\)"):
        tg.create_model("2c2f", in_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(tg.GloroInputError, match=r"did you mean \(3, 32, 32\)"):
        tg.create_model("6c2f", in_shape=(32, 32, 3), num_classes=10)
    assert tg.create_model("minicnn", in_shape=(3, 8, 8), num_classes=10)


def test_a_loss_given_backbone_logits_says_so():
    f = tg.create_model("minicnn", (1, 8, 8), 10)
    y = torch.arange(10)
    with pytest.raises(tg.GloroInputError, match=r"not the \(B, C\) of net.backbone\(x\)"):
        tg.GloroCrossEntropy()(f(torch.rand(10, 1, 8, 8)), y)
