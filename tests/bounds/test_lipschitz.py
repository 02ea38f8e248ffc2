"""Layer bounds: known answers, exact operator norms, and 'measured <= bound' properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgloro as tg
from torchgloro.bounds import registry
from torchgloro.bounds.registry import bound_for, flatten_layers


def explicit_operator(fn, in_shape):
    """The matrix of a linear map, built column by column from basis vectors (float64)."""
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        return fn(basis).reshape(n, -1).t()


def converged(layer, in_shape):
    b = bound_for(layer, in_shape)
    return b, float(b.converge(tol=1e-10, max_iter=20_000))


def test_orthogonal_dense_has_bound_one():
    lin = nn.Linear(16, 16)
    nn.init.orthogonal_(lin.weight)
    b, est = converged(lin, (16,))
    assert est == pytest.approx(1.0, rel=1e-5)
    assert b.sound() == pytest.approx(1.0, rel=1e-5) and b.sound() >= 1.0 - 1e-7


def test_scaled_identity_has_bound_equal_to_scale():
    lin = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(3.5 * torch.eye(8))
    b, est = converged(lin, (8,))
    assert est == pytest.approx(3.5, rel=1e-6)
    assert 3.5 <= b.sound() <= 3.5 * (1 + 1e-6)


def test_avgpool_2x2_stride_2_is_half():
    b = bound_for(nn.AvgPool2d(2, 2), (3, 8, 8))
    assert float(b.estimate()) == pytest.approx(0.5)
    assert b.sound() == pytest.approx(0.5)


def test_overlapping_avgpool_matches_explicit_operator():
    pool = nn.AvgPool2d(3, 1, padding=1)
    shape = (1, 6, 6)
    A = explicit_operator(lambda x: pool(x), shape)
    exact = float(torch.linalg.matrix_norm(A, 2))
    b = bound_for(pool, shape).sound()
    assert exact <= b <= exact * 1.01
    assert b < 1.0  # not the loose "1" bound


def test_maxpool_nonoverlapping_is_one_and_overlapping_is_bounded():
    assert bound_for(nn.MaxPool2d(2, 2), (1, 8, 8)).sound() == 1.0
    pool = nn.MaxPool2d(3, 1)
    b = bound_for(pool, (1, 8, 8)).sound()
    x1, x2 = torch.randn(200, 1, 8, 8), torch.randn(200, 1, 8, 8)
    ratio = (pool(x1) - pool(x2)).flatten(1).norm(dim=1) / (x1 - x2).flatten(1).norm(dim=1)
    assert b > 1.0 and float(ratio.max()) <= b


def test_avgpool_without_padding_ignores_count_include_pad():
    """With no padding every window is full, so count_include_pad=False is the same operator;
    it used to fall to the explicit-matrix path, refused above 4096 pixels."""
    shape = (1, 72, 72)
    a = bound_for(nn.AvgPool2d(3, 2, count_include_pad=False), shape).sound()
    assert a == bound_for(nn.AvgPool2d(3, 2), shape).sound()
    small = (1, 9, 9)
    pool = nn.AvgPool2d(3, 2, count_include_pad=False)
    exact = float(torch.linalg.matrix_norm(explicit_operator(pool, small), 2))
    assert exact <= bound_for(pool, small).sound() <= exact * 1.01


def test_maxpool_with_indices_is_a_clear_error():
    with pytest.raises(tg.UnsupportedLayerError, match="return_indices"):
        bound_for(nn.MaxPool2d(2, return_indices=True), (1, 8, 8))


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,dilation,groups,hw",
    [
        (2, 3, 3, 1, 1, 1, 1, (7, 7)),  # SAME, stride 1
        (2, 3, 3, 1, 0, 1, 1, (7, 7)),  # valid
        (2, 4, 4, 2, 1, 1, 1, (8, 8)),  # SAME (TF) stride 2
        (2, 4, 4, 2, 0, 1, 1, (8, 8)),  # valid stride 2
        (4, 4, 3, 1, 2, 2, 2, (7, 6)),  # dilation + groups
        (3, 2, 3, 2, "valid", 1, 1, (9, 9)),
        (3, 2, 3, 1, "same", 1, 1, (6, 6)),
        (2, 3, 4, 1, "same", 1, 1, (7, 7)),  # even kernel: asymmetric padding
        (2, 2, 3, 3, 1, 1, 1, (8, 7)),  # stride 3: output_padding needed
    ],
)
def test_conv_power_iteration_matches_explicit_svd(
    cin, cout, k, stride, padding, dilation, groups, hw
):
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups).double()
    shape = (cin, *hw)
    A = explicit_operator(
        lambda x: F.conv2d(x, conv.weight, None, stride, padding, dilation, groups), shape
    )
    exact = float(torch.linalg.matrix_norm(A, 2))
    b, est = converged(conv, shape)
    assert est == pytest.approx(exact, rel=1e-4)
    sound = b.sound()
    assert exact * (1 - 1e-12) <= sound <= exact * 1.01


def test_unsupported_layer_raises_with_names():
    with pytest.raises(tg.UnsupportedLayerError, match="LayerNorm.*Supported layers"):
        bound_for(nn.LayerNorm(3), (3,))
    with pytest.raises(tg.UnsupportedLayerError, match="Softmax"):
        tg.GloroNet(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Softmax(1), nn.Linear(4, 2)),
            0.1,
            in_shape=(1, 2, 2),
        )
    with pytest.raises(tg.UnsupportedLayerError, match="padding_mode"):
        bound_for(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))


def test_subclass_of_supported_layer_is_not_silently_accepted():
    class Doubling(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(tg.UnsupportedLayerError):
        bound_for(Doubling(), (4,))


def test_nested_sequentials_flatten_in_order():
    a, b, c = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)
    assert flatten_layers(nn.Sequential(nn.Sequential(a, b), c)) == [a, b, c]


def test_zero_weights_do_not_collapse_the_iterate():
    """TF gloro #8: a zero weight must not leave a 0/NaN iterate that sticks at bound 0."""
    lin = nn.Linear(5, 5, bias=False)
    b = bound_for(lin, (5,))
    with torch.no_grad():
        lin.weight.zero_()
    assert float(b.estimate(n_iter=3)) == 0.0
    assert torch.isfinite(b.u).all() and float(b.u.norm()) == pytest.approx(1.0)
    with torch.no_grad():
        lin.weight.copy_(2 * torch.eye(5))
    assert float(b.estimate(n_iter=3)) == pytest.approx(2.0, rel=1e-5)


def test_differentiable_estimate_gives_weight_gradients():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    b = bound_for(conv, (2, 6, 6))
    b.estimate(n_iter=20).detach()
    b.estimate(n_iter=1, differentiable=True).backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "k,stride,padding,dilation,groups,hw",
    [
        (4, 2, 1, 1, 1, (28, 28)),
        (4, 1, "same", 1, 1, (9, 9)),
        (3, 3, 1, 2, 2, (11, 10)),
        (5, 2, 0, 1, 1, (12, 13)),
    ],
)
def test_conv_adjoint_identity(k, stride, padding, dilation, groups, hw):
    """<A u, v> = <u, Aᵀ v> for the operator the power iteration uses."""
    conv = nn.Conv2d(4, 6, k, stride, padding, dilation, groups).double()
    b = bound_for(conv, (4, *hw))
    u = torch.randn(1, 4, *hw, dtype=torch.float64)
    Au = b._op(u, conv.weight.detach())
    v = torch.randn_like(Au)
    Atv = b._op_adjoint(v, conv.weight.detach())
    assert Atv.shape == u.shape
    assert float((Au * v).sum()) == pytest.approx(float((u * Atv).sum()), rel=1e-10)


def _grad_of_estimate(b, weight, native: bool):
    """Value and weight gradient of the differentiable estimate on one backend path."""
    b._native_cpu = native
    weight.grad = None
    value = b.estimate(differentiable=True)
    value.backward()
    return float(value.detach()), weight.grad.clone()


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,dilation,groups,hw",
    [
        (1, 16, 4, 2, 1, 1, 1, (28, 28)),  # 2C2F's first layer
        (4, 6, 4, 1, "same", 1, 1, (9, 9)),  # asymmetric padding: F.pad path
        (4, 6, 3, 3, 1, 2, 2, (11, 10)),  # stride, dilation, groups
        (3, 5, 5, 2, 0, 1, 1, (12, 13)),
    ],
)
def test_euler_estimate_matches_autograd(cin, cout, k, stride, padding, dilation, groups, hw):
    """The no-oneDNN path (⟨w, ∇_w‖A(w)u‖⟩) gives the same value and gradient as autograd."""
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups).double()
    b = bound_for(conv, (cin, *hw))
    b.estimate(n_iter=30)
    v_ref, g_ref = _grad_of_estimate(b, conv.weight, native=False)
    v_new, g_new = _grad_of_estimate(b, conv.weight, native=True)
    assert v_new == pytest.approx(v_ref, rel=1e-12)
    assert torch.allclose(g_new, g_ref, rtol=1e-10, atol=1e-14)
    assert float(g_ref.abs().sum()) > 0


def test_euler_estimate_of_zero_weight_is_zero_with_zero_gradient():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    b = bound_for(conv, (2, 5, 5))
    with torch.no_grad():
        conv.weight.zero_()
    value, grad = _grad_of_estimate(b, conv.weight, native=True)
    assert value == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_small_conv_rule_and_global_flag_restored():
    """Small single-instance convs skip oneDNN on CPU; the global flag is left as it was."""
    model = tg.create_model("2c2f", (1, 28, 28), 10)
    net = tg.GloroNet(model, 0.3)
    convs = [b for b in net.bounds if type(b).__name__ == "Conv2dBound"]
    assert len(convs) == 2 and all(b._native_cpu for b in convs)
    big = bound_for(nn.Conv2d(64, 64, 3, padding=1), (64, 14, 14))  # 7.2M multiply-adds
    assert not big._native_cpu
    before = torch.backends.mkldnn.enabled
    net.train()
    net(torch.rand(2, 1, 28, 28)).sum().backward()
    assert torch.backends.mkldnn.enabled == before
    with pytest.raises(RuntimeError):  # restored on errors too
        with registry._without_onednn():
            assert not torch.backends.mkldnn.enabled
            raise RuntimeError
    assert torch.backends.mkldnn.enabled == before
