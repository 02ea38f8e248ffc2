"""Losses (hand-computed cases), schedules, and activations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchgloro as tg
from torchgloro import schedules as S
from torchgloro.nn.activations import group_sort


def test_gloro_cross_entropy_treats_bottom_as_never_correct():
    logits = torch.tensor([[2.0, 0.0, 1.0]])  # classes 0, 1 then ⊥
    loss = tg.GloroCrossEntropy()(logits, torch.tensor([0]))
    expected = -2.0 + math.log(math.exp(2) + 1 + math.e)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_trades_matches_hand_formula():
    """Definition 3 with L = cross-entropy (the default), and the KL form."""
    lam, label = 2.0, torch.tensor([1])
    y = torch.tensor([1.0, -1.0, 0.5])
    p = torch.softmax(y[:2], 0)
    q = torch.softmax(y, 0)[:2]
    clean = F.cross_entropy(y[None, :2], label)
    for robust, term in (("ce", -(p * q.log()).sum()), ("kl", (p * (p / q).log()).sum())):
        logits = y[None].clone().requires_grad_(True)
        loss = tg.GloroTrades(lam, robust)(logits, label)
        assert loss.item() == pytest.approx(float(clean + lam * term), rel=1e-6)
        loss.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_trades_forms_differ_by_lambda_times_clean_entropy():
    """CE = KL + H(p), in value and gradient: the KL form lacks λ·∇H(p)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    logits[:, -1] = logits[:, :-1].amax(1) + 0.1  # a ⊥ as GloroNet makes it
    labels = torch.tensor([0, 1, 2, 0, 1])
    lam = 1.5
    grads, values = [], []
    for robust in ("ce", "kl"):
        x = logits.clone().requires_grad_(True)
        values.append(tg.GloroTrades(lam, robust)(x, labels))
        values[-1].backward()
        grads.append(x.grad)
    x = logits.clone().requires_grad_(True)
    log_p = F.log_softmax(x[:, :3], dim=1)
    entropy = -(log_p.exp() * log_p).sum(1).mean()
    (lam * entropy).backward()
    assert (values[0] - values[1]).item() == pytest.approx((lam * entropy).item(), rel=1e-10)
    assert torch.allclose(grads[0] - grads[1], x.grad, atol=1e-12)
    assert x.grad[:, :3].abs().max() > 1e-3  # the forms really differ in their gradients
    assert torch.all(x.grad[:, 3] == 0)  # ... but not on ⊥


def test_trades_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="ce"):
        tg.GloroTrades(1.0, "js")


def test_labels_out_of_range_raise():
    with pytest.raises(tg.GloroInputError, match=r"\[0, 2\)"):
        tg.GloroCrossEntropy()(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(tg.GloroInputError):
        tg.GloroTrades()(torch.zeros(2, 3), torch.tensor([-1, 0]))


def test_epsilon_schedules():
    assert S.parse_epsilon_schedule("single").value(3, 10, 0.45) == 0.45
    lin = S.parse_epsilon_schedule("0.1,0.5,10")
    assert lin.value(5, 100, 0.45) == pytest.approx(0.3)
    assert lin.value(11, 100, 0.45) == 0.45
    log = S.parse_epsilon_schedule("log")
    vals = [log.value(t, 100, 0.2) for t in range(0, 101, 5)]
    assert 0 < vals[0] < 1e-5 and vals[10] == pytest.approx(0.2) and vals[-1] == 0.2
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[2] > 0.2 * 0.2  # logarithmic: fast early growth (above the linear ramp)
    with pytest.raises(tg.ConfigError):
        S.parse_epsilon_schedule("cosine")


def test_lambda_and_lr_schedules():
    lam = S.parse_lambda_schedule("0,2,500")
    assert lam.value(250, 500) == pytest.approx(1.0) and lam.value(600, 500) == 2.0
    assert S.parse_lambda_schedule("1.2").value(7, 800) == 1.2
    lr = S.parse_lr_schedule("decay_to_1e-6")
    assert lr.value(100, 500, 1e-3) == 1e-3
    assert lr.value(500, 500, 1e-3) == pytest.approx(1e-6)
    assert lr.value(375, 500, 1e-3) == pytest.approx(math.sqrt(1e-3 * 1e-6))
    with pytest.raises(tg.ConfigError):
        S.parse_lr_schedule("decay_to_-1")


def test_scale_schedule_scales_only_ramp_lengths():
    assert S.scale_schedule("0,2,500", 0.1) == "0,2,50"
    assert S.scale_schedule("0.05, 1.75, 60", 0.5) == "0.05,1.75,30"
    assert S.scale_schedule("1,10,500", 0.003) == "1,10,1.5"
    for fixed in ("single", "log", "1.2", 2.0):  # already relative to the run, or constant
        assert S.scale_schedule(fixed, 0.1) == str(fixed)
    ramp = S.parse_lambda_schedule(S.scale_schedule("0,3,300", 0.1))
    assert ramp.value(15, 30) == pytest.approx(1.5) and ramp.value(30, 30) == 3


def test_decay_from_epoch_zero_as_in_the_authors_code():
    lr = S.parse_lr_schedule("decay_to_5e-6", decay_start=0.0)
    assert lr.value(0, 300, 1e-3) == 1e-3
    assert lr.value(150, 300, 1e-3) == pytest.approx(math.sqrt(1e-3 * 5e-6))
    assert lr.value(300, 300, 1e-3) == pytest.approx(5e-6)
    later = S.parse_lr_schedule("decay_to_5e-6", decay_start=0.25)
    assert later.value(75, 300, 1e-3) == 1e-3 and later.value(76, 300, 1e-3) < 1e-3


def _minmax_autograd(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The plain-autograd MinMax the custom backward must reproduce."""
    shape = x.shape[:dim] + (x.shape[dim] // 2, 2) + x.shape[dim + 1 :]
    a, b = x.reshape(shape).unbind(dim + 1)
    return torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim + 1).reshape(x.shape)


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_minmax_gradient_matches_autograd_through_min_and_max(dim):
    torch.manual_seed(0)
    x = torch.randn(5, 6, 4, 8, dtype=torch.float64)
    x[:, :, :2] = 0.0  # ties, as on a zero background with zero biases
    x.requires_grad_(True)
    g = torch.randn(5, 6, 4, 8, dtype=torch.float64)
    y = group_sort(x, 2, dim)
    y_ref = _minmax_autograd(x, dim % 4)
    assert torch.equal(y, y_ref)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    tie = (x.detach() == x.detach().roll(1, dim)) | (x.detach() == x.detach().roll(-1, dim))
    assert torch.equal(gx[~tie], gx_ref[~tie])  # exact off ties
    torch.testing.assert_close(gx[tie], gx_ref[tie], rtol=0, atol=1e-15)  # halves on ties
    assert tie.any() and (~tie).any()
    # second order (a double backward through the custom function), and no grad at all
    xs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: group_sort(t, 2) * t, (xs,))
    assert torch.autograd.gradgradcheck(lambda t: group_sort(t, 2) * t, (xs,))
    with torch.no_grad():
        assert torch.equal(group_sort(x, 2, dim), y_ref)


def test_minmax_and_groupsort_are_lipschitz_one_and_gradient_norm_preserving():
    x = torch.randn(64, 8, 3, 3, requires_grad=True)
    for act in (tg.MinMax(), tg.GroupSort(4)):
        y = act(x)
        assert torch.equal(y.sort(1).values, x.sort(1).values)  # a permutation per sample
        x2 = torch.randn(64, 8, 3, 3)
        ratio = (act(x2) - y).flatten(1).norm(dim=1) / (x2 - x).flatten(1).norm(dim=1)
        assert float(ratio.max().detach()) <= 1 + 1e-6
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert float(g.abs().sum()) == pytest.approx(x.numel())
    assert torch.equal(tg.MinMax()(torch.tensor([[3.0, 1.0]])), torch.tensor([[1.0, 3.0]]))
    with pytest.raises(tg.GloroInputError, match="divisible"):
        tg.MinMax()(torch.randn(2, 3))


def test_minmax_compiles_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), tg.MinMax(), torch.nn.Flatten())
    x = torch.randn(3, 1, 6, 6)
    f(x).square().sum().backward()
    eager = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    y = torch.compile(f, backend="aot_eager")(x)
    torch.testing.assert_close(y, f(x))
    y.square().sum().backward()
    for g, p in zip(eager, f.parameters()):
        torch.testing.assert_close(p.grad, g)
