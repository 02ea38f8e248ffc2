"""The liresnet model family: construction, GloroNet training/certification, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import torchgloro as tg
import torchgloro.nn.liresnet  # noqa: F401  (registers "liresnet")
from torchgloro.losses import GloroEMMA
from torchgloro.nn.layers import LiResBlock, LLNLinear

SHAPE = (3, 16, 16)
SMALL = (3, 8, 8)  # for the cheaper checks: sound bounds of 8-channel 8×8 maps are fast


def _net(shape=SHAPE, **kw):
    kw = {"activation": "minmax", "depth": 2, "width": 16, **kw}
    return tg.GloroNet(tg.create_model("liresnet", shape, 10, **kw), epsilon=0.1)


@pytest.fixture(scope="module")
def trained():
    """The (3, 16, 16), depth 2, width 16 net after two EMMA + CE training steps."""
    torch.manual_seed(0)
    net = _net()
    x, y = torch.rand(8, *SHAPE), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    net.train()
    loss_fn = GloroEMMA(net)
    grads_finite = True
    for _ in range(2):
        opt.zero_grad()
        logits = net(x)
        loss = loss_fn(logits, y) + tg.GloroCrossEntropy()(logits, y)
        loss.backward()
        grads_finite &= all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    changed = all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    net.eval()
    return net, x, grads_finite, changed


def test_registered_and_structure():
    assert "liresnet" in tg.list_models()
    f = tg.create_model("liresnet", SHAPE, 10, activation="minmax", depth=3, width=16)
    blocks = [m for m in f if isinstance(m, LiResBlock)]
    assert len(blocks) == 3
    assert all(b.residual_scale == pytest.approx(3**-0.5) for b in blocks)
    assert isinstance(f[-1], LLNLinear)
    assert f(torch.randn(2, *SHAPE)).shape == (2, 10)
    json.dumps(f.gloro_spec)
    assert f.gloro_spec["depth"] == 3


@pytest.mark.parametrize(
    "kw",
    [
        {"lln": False},
        {"stem_stride": 2, "neck_stride": 1, "dense_width": 0},
        {"stem_stride": 3, "neck_stride": 3, "affine": True, "activation": "relu"},
        {"depth": 0, "kernel_size": 5, "residual_scale": 0.5, "lln_scale": 2.0},
    ],
)
def test_variants_build_and_certify(kw):
    net = _net(SMALL, **{"width": 8, "dense_width": 32, **kw})
    head = net.backbone[-1]
    assert isinstance(head, nn.Linear if kw.get("lln") is False else LLNLinear)
    x = torch.rand(3, *SMALL)
    assert net(x).shape == (3, 11)
    c = net.certify(x)
    assert c.radius.shape == (3,)


def test_train_step_and_certify(trained):
    net, x, grads_finite, changed = trained
    assert grads_finite and changed
    cs, cf = net.certify(x), net.certify(x, mode="fast")
    assert torch.equal(cs.pred, cf.pred)
    # Sound constants are proven upper bounds, so sound radii never exceed fast ones (much).
    assert (cs.radius <= cf.radius * 1.001 + 1e-9).all()
    ks, kf = net.lipschitz_constant("sound"), net.lipschitz_constant("fast")
    off = ~torch.eye(10, dtype=torch.bool)
    assert (ks[off] >= kf.double()[off] * (1 - 1e-4)).all()


def test_save_load_roundtrip(trained, tmp_path):
    # Needs nn.Module.to() to work on every bound (tg.load calls net.to(map_location)).
    net, x, _, _ = trained
    path = tmp_path / "liresnet.safetensors"
    net.save(path)
    loaded = tg.load(path)
    torch.testing.assert_close(loaded(x), net(x))
    torch.testing.assert_close(loaded.lipschitz_constant("fast"), net.lipschitz_constant("fast"))
    c1, c2 = net.certify(x, mode="fast"), loaded.certify(x, mode="fast")
    torch.testing.assert_close(c1.radius, c2.radius)


def test_measured_margin_change_below_sound_constant():
    torch.manual_seed(1)
    net = _net(SMALL, width=8, neck_stride=2, dense_width=32).eval()
    f = copy.deepcopy(net.backbone).double()
    K = net.lipschitz_constant("sound")
    x1 = torch.rand(16, *SMALL, dtype=torch.float64)
    x2 = x1 + 0.05 * torch.randn_like(x1)
    with torch.no_grad():
        d = f(x1) - f(x2)  # (B, C)
    dist = (x1 - x2).flatten(1).norm(dim=1)
    pair = (d[:, :, None] - d[:, None, :]).abs()  # |Δ(f_j − f_i)|
    assert (pair <= K[None] * dist[:, None, None] + 1e-12).all()


def test_orthogonal_init_reaches_block_convs():
    f = tg.create_model(
        "liresnet", SMALL, 10, activation="minmax", init="orthogonal", depth=2, width=8
    )
    for blk in (m for m in f if isinstance(m, LiResBlock)):
        w = blk.conv.weight.detach().reshape(8, -1)
        torch.testing.assert_close(w @ w.t(), torch.eye(8), atol=1e-5, rtol=0)
    net = tg.GloroNet(f, 0.1)
    assert torch.isfinite(net.lipschitz_constant("sound")).all()


def test_bad_kwargs():
    with pytest.raises(tg.GloroInputError):
        tg.create_model("liresnet", SHAPE, 10, depth=-1)
    with pytest.raises(tg.GloroInputError):
        tg.create_model("liresnet", SHAPE, 10, kernel_size=4)
