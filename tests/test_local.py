"""The local-bound fallback (torchgloro.local): sound, tighter than global, deterministic."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import torchgloro as tg
from torchgloro._errors import GloroInputError
from torchgloro.evaluate import pgd_l2
from torchgloro.local import certify_local, local_margin_lipschitz

EPSILONS = (0.15, 0.3, 0.5)


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.tensor([[0.0, 1.2], [-1.1, -0.7], [1.1, -0.7]])
    y = torch.arange(n) % 3
    x = centers[y] + 0.45 * torch.randn(n, 2, generator=gen)
    return x.reshape(n, 1, 1, 2), y


@pytest.fixture(scope="module")
def toy():
    """A tiny ReLU net on 3 Gaussian blobs in 2-D, trained briefly with GloRo CE."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    f = nn.Sequential(
        nn.Flatten(),
        nn.Linear(2, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )
    net = tg.GloroNet(f, epsilon=0.3, in_shape=(1, 1, 2), power_iterations=2)
    x, y = _blobs(600, gen)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = tg.GloroCrossEntropy()
    net.train()
    for _ in range(300):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    net.eval()
    net.refresh()
    xt, _ = _blobs(240, gen)
    return net, xt


def _ball_points(center: torch.Tensor, eps: float, n_grid: int = 400, n_circle: int = 4000):
    """A 400×400 grid of the disk of radius eps around ``center`` (2,) plus its circle."""
    t = torch.linspace(-eps, eps, n_grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    d = torch.stack([gx.flatten(), gy.flatten()], 1)
    d = d[d.norm(dim=1) <= eps]
    a = torch.linspace(0, 2 * math.pi, n_circle, dtype=torch.float64)
    circ = eps * (1 - 1e-12) * torch.stack([a.cos(), a.sin()], 1)
    return center.double() + torch.cat([d, circ])


def test_toy_never_certifies_refuted_points_and_beats_global(toy):
    net, xt = toy
    f64 = net._sound_state().backbone64
    extra_total = 0
    for eps in EPSILONS:
        cert = net.certify(xt, eps)
        ok = certify_local(net, xt, eps, cert)
        assert bool((ok | ~cert.certified).all())  # the global certificates are kept
        extra = ok & ~cert.certified
        extra_total += int(extra.sum())
        K = local_margin_lipschitz(net, xt[extra], eps)
        for k, b in enumerate(torch.nonzero(extra).flatten().tolist()):
            pts = _ball_points(xt[b, 0, 0], eps)
            with torch.no_grad():
                y = f64(pts.reshape(-1, 1, 1, 2))
            j = int(cert.pred[b])
            assert bool((y.argmax(1) == j).all()), f"eps={eps}: point {b} refuted by the grid"
            # Stronger: K_loc bounds every difference quotient of f_j − f_i inside the ball.
            g = y[:, j : j + 1] - y  # (N, C)
            idx = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(b))
            a, c = idx[:20000], idx[20000:40000]
            dist = (pts[a] - pts[c]).norm(dim=1, keepdim=True)
            quot = (g[a] - g[c]).abs() / dist.clamp_min(1e-300)
            assert bool((quot <= K[k][j] * (1 + 1e-9) + 1e-12).all())
    assert extra_total > 0, "the local bound should certify some points the global one cannot"
    print(f"\ntoy: local fallback certified {extra_total} extra (point, eps) pairs")


def test_local_k_at_most_global(toy, trained_digits_net):
    net, xt = toy
    for eps in EPSILONS:
        K = local_margin_lipschitz(net, xt[:40], eps)
        Kg = net.lipschitz_constant("sound")
        assert K.shape == (40, 3, 3)
        assert bool((K <= Kg).all()) and bool((K >= 0).all())
        assert bool((K < Kg).any())
    dnet, _, test = trained_digits_net
    K = local_margin_lipschitz(dnet, test.x[:16], dnet.epsilon)
    assert bool((K <= dnet.lipschitz_constant("sound")).all())


def test_deterministic_and_batch_independent(toy, trained_digits_net):
    net, xt = toy
    x = xt[:50]
    eps = 0.3
    a = certify_local(net, x, eps, net.certify(x, eps))
    b = certify_local(net, x, eps, net.certify(x, eps))
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    c = certify_local(net, x[perm], eps, net.certify(x[perm], eps))
    assert torch.equal(a, b) and torch.equal(a[perm], c)
    K1 = local_margin_lipschitz(net, x, eps)
    K2 = local_margin_lipschitz(net, x[perm], eps)
    assert torch.equal(K1[perm], K2)
    dnet, _, test = trained_digits_net
    xd = test.x[:12]
    Kd = local_margin_lipschitz(dnet, xd, dnet.epsilon)
    assert torch.equal(Kd[3:4], local_margin_lipschitz(dnet, xd[3:4], dnet.epsilon))
    assert torch.equal(Kd.flip(0), local_margin_lipschitz(dnet, xd.flip(0), dnet.epsilon))


def test_digits_vra_gain_and_pgd(trained_digits_net):
    net, _, test = trained_digits_net
    eps = net.epsilon
    x, y = test.x, test.y
    cert = net.certify(x, eps)
    t0 = time.perf_counter()
    ok = certify_local(net, x, eps, cert)
    dt = time.perf_counter() - t0
    n_tried = int((~cert.certified).sum())
    vra_global = float((cert.certified & (cert.pred == y)).double().mean())
    vra_local = float((ok & (cert.pred == y)).double().mean())
    assert vra_local >= vra_global
    assert bool((ok | ~cert.certified).all())
    print(
        f"\ndigits minicnn eps={eps}: VRA {vra_global:.4f} -> {vra_local:.4f} "
        f"(+{vra_local - vra_global:.4f}); certified {int(cert.certified.sum())} -> "
        f"{int(ok.sum())} of {len(y)}; {n_tried} uncertified points examined in {dt:.2f}s "
        f"({1e3 * dt / max(n_tried, 1):.1f} ms/point)"
    )
    # Every point it certifies survives a 50-step ℓ2 PGD within ε (no box: the certificate
    # covers the whole ball).
    idx = torch.nonzero(ok).flatten()
    res = pgd_l2(net.backbone, x[idx], cert.pred[idx], eps, steps=50, clip=None)
    assert not bool(res.fooled.any())
    assert res.max_norm <= eps


def test_rejects_fast_certificates_and_eps_mismatch(toy):
    net, xt = toy
    with pytest.raises(GloroInputError):
        certify_local(net, xt[:4], 0.3, net.certify(xt[:4], 0.3, mode="fast"))
    with pytest.raises(GloroInputError):
        certify_local(net, xt[:4], 0.2, net.certify(xt[:4], 0.3))


def test_other_layer_kinds_are_bounded_soundly():
    """Zero padding, pooling, MinMax and a standalone ReLU: K_loc ≤ K_glob, and K_loc bounds
    the difference quotients of random pairs inside the ball."""
    torch.manual_seed(3)
    f = nn.Sequential(
        nn.ZeroPad2d((1, 2, 1, 2)),
        nn.Conv2d(1, 4, 4, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, 1, padding=1),
        tg.MinMax(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )
    net = tg.GloroNet(f, epsilon=0.2, in_shape=(1, 8, 6)).eval()
    x = torch.randn(6, 1, 8, 6)
    K = local_margin_lipschitz(net, x, 0.2)
    assert bool((K <= net.lipschitz_constant("sound")).all())
    f64 = net._sound_state().backbone64
    gen = torch.Generator().manual_seed(0)
    for b in range(x.shape[0]):
        d = torch.randn(4000, 1, 8, 6, dtype=torch.float64, generator=gen)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.2 * torch.rand(4000, 1, 1, 1)
        with torch.no_grad():
            y = f64(x[b].double() + d)
        a, c = y[:2000], y[2000:]
        dist = (d[:2000] - d[2000:]).flatten(1).norm(dim=1)
        for j in range(4):
            quot = ((a[:, j : j + 1] - a) - (c[:, j : j + 1] - c)).abs() / dist[:, None]
            assert bool((quot <= K[b, j] * (1 + 1e-9) + 1e-12).all())


@pytest.mark.parametrize(
    ("p", "q", "x_norm"), [(0.0, 0.7, 0.0), (0.0, 3e-50, 0.0), (0.1, 0.0, 7.0)]
)
def test_the_local_error_bound_is_a_float64_upper_bound(p, q, x_norm):
    """Issue #30, item 3: ``_err`` built its bound as float32 rounded to nearest: 0.7 became
    0.69999999 (below the bound) and 3e-50 became 0."""
    from torchgloro.local import _err, _Step

    step = _Step("affine", nn.Identity(), 1.0, (p, q))
    err = _err(step, x_norm)
    assert err.dtype == torch.float64 and float(err) >= p * x_norm + q > 0


def test_the_local_bound_never_overwrites_the_callers_input():
    """Issue #30, item 4, for the local fallback's public entry points: a float64 batch went
    through a block with an in-place first layer unchanged only by luck of the copy."""
    from torchgloro.nn.layers import Residual

    torch.manual_seed(0)
    block = Residual(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)))
    f = nn.Sequential(block, nn.Linear(4, 3)).double()
    net = tg.GloroNet(f, 0.1, in_shape=(4,)).eval()
    x = torch.tensor([[-1.0, 2.0, -3.0, 4.0]], dtype=torch.float64)
    local_margin_lipschitz(net, x, 0.1)
    certify_local(net, x, 0.1, net.certify(x.clone(), epsilon=0.1))
    assert x.tolist() == [[-1.0, 2.0, -3.0, 4.0]]
