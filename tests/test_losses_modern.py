"""EMMA and hinge losses: hand-computed values and gradients, and use with a GloroNet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgloro as tg
from torchgloro.losses import (
    LOSSES,
    GloroCrossEntropy,
    GloroEMMA,
    GloroHinge,
    GloroTrades,
    live_lipschitz,
)

K3 = [[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]]
EPS = 0.5
# Sample 0: label 0, close to class 1 (ε_1 = margin/K = 0.25 < ε), far from class 2 (ε_2 = ε).
# Sample 1: label 1, misclassified (negative margins: ε_i = 0, plain cross-entropy).
LOGITS = [[3.0, 2.5, 0.0, 99.0], [1.0, 0.0, 0.5, -7.0]]  # last column: ⊥, ignored by EMMA
LABELS = [0, 1]


def _emma_by_hand(min_fraction=0.0):
    """Robust logits, per-class ε_i, and the loss, computed by hand for LOGITS/K3/EPS."""
    # Sample 0: margins f_0 − f_i = (0, 0.5, 3); ε·K_0i = (0, 1, 2) → fractions (·, 0.5, 1).
    e0 = [0.0, 0.25, 0.5]
    r0 = [3.0, 2.5 + 0.25 * 2.0, 0.0 + 0.5 * 4.0]  # = (3, 3, 2)
    # Sample 1: margins f_1 − f_i = (−1, 0, −0.5) → fractions clipped to min_fraction.
    m = min_fraction * EPS
    e1 = [m, 0.0, m]
    r1 = [1.0 + m * 2.0, 0.0, 0.5 + m * 1.0]
    loss0 = math.log(sum(math.exp(v) for v in r0)) - r0[0]
    loss1 = math.log(sum(math.exp(v) for v in r1)) - r1[1]
    return [r0, r1], [e0, e1], (loss0 + loss1) / 2


@pytest.mark.parametrize("min_fraction", [0.0, 0.01])
def test_emma_value_and_gradients_by_hand(min_fraction):
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    K = torch.tensor(K3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(LABELS)
    loss_fn = GloroEMMA(epsilon=EPS, min_fraction=min_fraction)
    robust, eps_i, expected = _emma_by_hand(min_fraction)
    torch.testing.assert_close(
        loss_fn.robust_logits(logits, y, K=K), torch.tensor(robust, dtype=torch.float64)
    )
    assert min_fraction or robust[0][0] == robust[0][1]  # class 1 is pushed to the boundary
    loss = loss_fn(logits, y, K=K)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # ε_i is a constant: ∂/∂f = (softmax(f̃) − onehot(y)) / B, and ⊥ gets no gradient.
    p = torch.softmax(torch.tensor(robust, dtype=torch.float64), dim=1)
    onehot = F.one_hot(y, 3).double()
    g_logits = torch.cat([(p - onehot) / 2, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(logits.grad, g_logits)
    # ∂/∂K[y, i] = p_i·ε_i / B for i ≠ y; other entries of K are unused.
    g_K = torch.zeros(3, 3, dtype=torch.float64)
    for b, label in enumerate(LABELS):
        for i in range(3):
            if i != label:
                g_K[label, i] += p[b, i] * eps_i[b][i] / 2
    torch.testing.assert_close(K.grad, g_K)


def test_emma_basic_variant_uses_sum_of_class_bounds():
    Kb = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    f = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    # K_0i = K_0 + K_i = (·, 3, 1.5); ε = 0.2 → ε·K = (·, 0.6, 0.3); margins (1, 2) → full ε.
    out = GloroEMMA(epsilon=0.2).robust_logits(f, y, K=Kb)
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.6, 0.3]], dtype=torch.float64))


def test_emma_full_epsilon_when_all_margins_large_equals_margin_ce():
    """Far from every boundary, EMMA is CE on f_i + ε·K_yi (the certified-margin CE)."""
    f = torch.tensor([[10.0, 0.0, -3.0]])
    K = torch.tensor(K3)
    y = torch.tensor([0])
    expected = F.cross_entropy(f + EPS * K[0], y)
    assert GloroEMMA(epsilon=EPS)(f, y, K=K).item() == pytest.approx(expected.item())


def test_emma_needs_k_or_net():
    with pytest.raises(tg.GloroInputError, match="bind"):
        GloroEMMA(epsilon=0.1)(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(tg.GloroInputError):
        GloroEMMA(epsilon=0.1)(torch.zeros(2, 6), torch.tensor([0, 1]), K=torch.ones(3, 3))
    with pytest.raises(tg.GloroInputError):
        GloroEMMA(min_fraction=2.0)


def _small_net(lipschitz="margin"):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(5, 8), tg.MinMax(), nn.Linear(8, 3))
    return tg.GloroNet(f, 0.3, in_shape=(5,), lipschitz=lipschitz)


@pytest.mark.parametrize("lipschitz", ["margin", "basic"])
def test_emma_bound_to_net_matches_explicit_k_and_trains(lipschitz):
    net = _small_net(lipschitz)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    net.train()
    logits = net(x)
    loss_fn = GloroEMMA(net)
    loss = loss_fn(logits, y)
    K = live_lipschitz(net)
    assert K.requires_grad  # differentiable in training mode
    explicit = GloroEMMA()(logits, y, K=K, epsilon=net.epsilon)
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-6)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # ε follows the net (schedules set net.epsilon); a fixed ε overrides it.
    with torch.no_grad():
        net.epsilon = 1e-6
        small = GloroEMMA().bind(net)(net(x), y).item()
        plain = F.cross_entropy(net(x)[:, :3], y).item()
    assert small == pytest.approx(plain, rel=1e-4)
    net.eval()
    torch.testing.assert_close(live_lipschitz(net), net.lipschitz_constant("fast"))


def test_emma_loss_is_not_a_submodule_owner():
    net = _small_net()
    loss_fn = GloroEMMA(net)
    assert list(loss_fn.parameters()) == []
    assert loss_fn.state_dict() == {}


# ---- hinge -----------------------------------------------------------------------------------


def test_hinge_value_and_gradient_by_hand():
    # Row 0: z_y − max other = 3 − 2.8 (⊥) = 0.2 → 0.8. Row 1: 5 − 2 = 3 ≥ 1 → 0.
    z = torch.tensor([[3.0, 2.5, 0.0, 2.8], [5.0, 1.0, 0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = GloroHinge(margin=1.0)(z, y)
    assert loss.item() == pytest.approx(0.4)
    loss.backward()
    expected = torch.zeros(2, 4)
    expected[0, 0], expected[0, 3] = -0.5, 0.5
    torch.testing.assert_close(z.grad, expected)
    assert GloroHinge(margin=0.1)(z, y).item() == 0.0


def test_certified_hinge_by_hand():
    f = torch.tensor([[3.0, 2.5, 0.0, 123.0]], requires_grad=True)
    K = torch.tensor(K3, requires_grad=True)
    y = torch.tensor([0])
    # z = f + ε·K_0 = (3, 3.5, 2) → certified margin 3 − 3.5 = −0.5 → loss 1 + 0.5.
    loss = GloroHinge(margin=1.0, certified=True, epsilon=EPS)(f, y, K=K)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    torch.testing.assert_close(f.grad, torch.tensor([[-1.0, 1.0, 0.0, 0.0]]))
    expected_k = torch.zeros(3, 3)
    expected_k[0, 1] = EPS
    torch.testing.assert_close(K.grad, expected_k)


def test_certified_hinge_with_net():
    net = _small_net()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    net.train()
    loss = GloroHinge(certified=True, net=net)(net(x), y)
    loss.backward()
    assert torch.isfinite(loss)


def test_losses_registry():
    assert LOSSES == {
        "ce": GloroCrossEntropy,
        "trades": GloroTrades,
        "emma": GloroEMMA,
        "hinge": GloroHinge,
    }
    logits, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    logits[:, -1] = logits[:, :-1].amax(1)  # a ⊥ as GloroNet makes it: ≥ the runner-up
    for name in ("ce", "trades", "hinge"):
        assert torch.isfinite(LOSSES[name]()(logits, y))
