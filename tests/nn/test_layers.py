"""LiResBlock, Residual and LLNLinear: known answers, measured ≤ bound, explicit operators."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchgloro as tg
from torchgloro.bounds.nn_layers import LiResBlockBound, LLNLinearBound, ResidualBound
from torchgloro.bounds.registry import bound_for, supported_layers
from torchgloro.margins import forward_error_coefficients
from torchgloro.nn.layers import LiResBlock, LLNLinear, Residual


def _max_ratio(f, in_shape, n=64, scale=1.0, dtype=torch.float64):
    """Largest ‖f(x1) − f(x2)‖/‖x1 − x2‖ over random pairs (near and far)."""
    f = copy.deepcopy(f).to(dtype)
    x1 = torch.randn(n, *in_shape, dtype=dtype)
    d = torch.randn(n, *in_shape, dtype=dtype)
    d = d * torch.logspace(-3, 0, n, dtype=dtype).view(-1, *[1] * len(in_shape)) * scale
    with torch.no_grad():
        num = (f(x1 + d) - f(x1)).flatten(1).norm(dim=1)
    return (num / d.flatten(1).norm(dim=1)).max().item()


def _operator_matrix(f, in_shape):
    """The matrix of a linear map f (biases removed: f(x) − f(0)), float64."""
    f = copy.deepcopy(f).double()
    n = torch.Size(in_shape).numel()
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        cols = f(eye) - f(torch.zeros(1, *in_shape, dtype=torch.float64))
    return cols.reshape(n, -1).t()  # (out, in)


def test_registered():
    names = supported_layers()
    for name in ("LiResBlock", "Residual", "LLNLinear"):
        assert name in names


# ---- LiResBlock ------------------------------------------------------------------------------


def test_liresblock_is_x_plus_alpha_conv():
    blk = LiResBlock(4, 3, residual_scale=0.3, bias=True, affine=True)
    with torch.no_grad():
        blk.scale.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        blk.bias.copy_(torch.randn(4))
    x = torch.randn(2, 4, 6, 6)
    expected = (x + 0.3 * blk.conv(x)) * blk.scale.view(1, -1, 1, 1) + blk.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["zero_weight", "zero_alpha"])
def test_liresblock_identity_has_bound_one(case):
    blk = LiResBlock(4, 3, residual_scale=0.0 if case == "zero_alpha" else 0.7)
    if case == "zero_weight":
        nn.init.zeros_(blk.conv.weight)
    b = bound_for(blk, (4, 6, 6))
    assert isinstance(b, LiResBlockBound)
    assert b.converge().item() == pytest.approx(1.0, abs=1e-6)
    assert 1.0 <= b.sound() <= 1.0 + 1e-6


def test_liresblock_affine_bound_is_max_abs_gamma_when_w_zero():
    blk = LiResBlock(4, 3, affine=True)
    nn.init.zeros_(blk.conv.weight)
    with torch.no_grad():
        blk.scale.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0]))
    b = bound_for(blk, (4, 5, 5))
    assert b.converge().item() == pytest.approx(3.0, rel=1e-5)
    assert 3.0 <= b.sound() <= 3.0 * (1 + 1e-6)


def test_liresblock_rejects_even_kernel_and_wrong_channels():
    with pytest.raises(tg.GloroInputError):
        LiResBlock(4, kernel_size=2)
    with pytest.raises(tg.UnsupportedLayerError):
        bound_for(LiResBlock(4), (3, 6, 6))


@pytest.mark.parametrize("affine", [False, True])
def test_liresblock_explicit_operator_svd(affine):
    torch.manual_seed(1)
    blk = LiResBlock(4, 3, residual_scale=0.5, bias=True, affine=affine)
    with torch.no_grad():
        blk.conv.weight.normal_(0, 0.3)
        blk.bias.normal_()
        if affine:
            blk.scale.uniform_(-1.5, 1.5)
    shape = (4, 6, 6)
    A = _operator_matrix(blk, shape)
    svd = torch.linalg.matrix_norm(A, ord=2).item()
    b = bound_for(blk, shape)
    snd = b.sound()
    assert svd <= snd <= 1.01 * svd
    est = b.converge(tol=1e-7).item()
    assert abs(est - svd) <= 1e-4 * svd
    # The folded bound is much tighter than 1 + α‖W‖ (here by a wide margin).
    w_norm = torch.linalg.matrix_norm(_operator_matrix(blk.conv, shape), ord=2).item()
    if not affine:
        assert svd < 1 + 0.5 * w_norm


def test_liresblock_measured_below_bound():
    torch.manual_seed(2)
    blk = LiResBlock(6, 3, residual_scale=0.8, affine=True)
    with torch.no_grad():
        blk.scale.uniform_(0.5, 1.5)
    shape = (6, 7, 5)
    b = bound_for(blk, shape)
    est = b.converge(tol=1e-7).item()
    ratio = _max_ratio(blk, shape)
    assert ratio <= est * 1.001
    assert ratio <= b.sound()


def test_liresblock_estimate_is_differentiable():
    blk = LiResBlock(4, 3, residual_scale=0.5, affine=True)
    b = bound_for(blk, (4, 6, 6))
    b.estimate(n_iter=20)
    b.estimate(differentiable=True).backward()
    assert blk.conv.weight.grad is not None and blk.conv.weight.grad.abs().sum() > 0
    assert blk.scale.grad is not None and blk.scale.grad.abs().sum() > 0
    assert not b.estimate().requires_grad


def test_liresblock_fp_terms_is_folded_conv():
    blk = LiResBlock(3, 3, residual_scale=0.5)
    n, abs_norm, bias_norm = bound_for(blk, (3, 4, 4)).fp_terms()
    assert n == 3 * 9 + 1
    assert abs_norm >= 1.0  # the identity tap alone has |A| = I
    assert bias_norm >= 0


def test_derived_weights_agree_bitwise_in_float64_copies():
    """The float64 copy used by sound certification evaluates the exact bounded operator."""
    blk = LiResBlock(5, 3, residual_scale=0.37, affine=True)
    with torch.no_grad():
        blk.scale.uniform_(-2, 2)
    blk64 = copy.deepcopy(blk).double()
    assert torch.equal(blk64.folded_kernel(), blk.folded_kernel().double())
    head = LLNLinear(7, 4, scale=1.3, learn_scale=True)
    head64 = copy.deepcopy(head).double()
    assert torch.equal(head64.effective_weight(), head.effective_weight().double())


# ---- Residual --------------------------------------------------------------------------------


def _zero(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def test_residual_of_zero_branch_has_bound_one():
    r = Residual(nn.Sequential(_zero(nn.Conv2d(3, 3, 3, padding=1)), nn.ReLU()))
    b = bound_for(r, (3, 5, 5))
    assert isinstance(b, ResidualBound)
    assert b.converge().item() == pytest.approx(1.0, abs=1e-6)
    assert 1.0 <= b.sound() <= 1.0 + 1e-9
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(r(x), x)


def test_residual_bound_is_one_plus_product():
    torch.manual_seed(3)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
    r = Residual(nn.Sequential(c1, tg.MinMax(), c2))
    shape = (3, 6, 6)
    b = bound_for(r, shape)
    k1, k2 = bound_for(c1, shape), bound_for(c2, (4, 6, 6))
    est = b.converge(tol=1e-7).item()
    assert est == pytest.approx(
        1 + k1.converge(tol=1e-7).item() * k2.converge(tol=1e-7).item(), rel=1e-4
    )
    assert b.sound() >= 1 + k1.sound() * k2.sound()
    ratio = _max_ratio(r, shape)
    assert ratio <= est * 1.001
    assert ratio <= b.sound()


def test_residual_nested_and_single_module():
    inner = Residual(nn.Linear(6, 6))  # a single module gets wrapped
    r = Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), inner))
    b = bound_for(r, (6,))
    assert _max_ratio(r, (6,)) <= b.sound()
    assert sorted(b.state_dict()) == ["inner.0.u", "inner.2.inner.0.u"]  # saved with the net


def test_residual_with_an_in_place_first_layer_adds_its_own_input():
    """g = ELU(α=2, in place) then Linear: an in-place g1 would make the block compute
    g1(x) + g'(g1(x)) (Lipschitz up to 2·(1 + L_g')), past the bound 1 + 2·L_g'."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    r_in = Residual(nn.Sequential(nn.ELU(alpha=2.0, inplace=True), lin))
    r_out = Residual(nn.Sequential(nn.ELU(alpha=2.0), lin))
    x = -torch.rand(3, 4) - 0.5  # ELU's negative side, where α = 2 changes the value
    x0 = x.clone()
    torch.testing.assert_close(r_in(x), r_out(x0))
    torch.testing.assert_close(x, x0)  # the caller's tensor is left as it was
    assert _max_ratio(r_in, (4,)) <= bound_for(r_in, (4,)).sound()


def test_residual_rejects_shape_change():
    with pytest.raises(tg.UnsupportedLayerError):
        bound_for(Residual(nn.Sequential(nn.Linear(4, 5))), (4,))
    with pytest.raises(tg.UnsupportedLayerError):
        bound_for(Residual(nn.Sequential(nn.Softmax(1))), (4,))


def test_residual_fp_model_covers_float32_error(monkeypatch):
    """The round-off model, instantiated for float32, covers float32 vs float64 outputs."""
    torch.manual_seed(4)
    monkeypatch.setattr(ResidualBound, "unit_roundoff", 2.0**-24)
    inner = Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), tg.MinMax()))
    r = Residual(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), LiResBlock(4, 3, 0.5), inner)
    )
    with torch.no_grad():
        for p in r.parameters():
            p.mul_(4.0)
    shape = (4, 6, 6)
    b = bound_for(r, shape)
    p, q = forward_error_coefficients([(b.sound(), b.fp_terms())], unit_roundoff=2.0**-24)
    x = torch.randn(32, *shape) * torch.logspace(-2, 2, 32).view(-1, 1, 1, 1)
    with torch.no_grad():
        err = (r(x).double() - copy.deepcopy(r).double()(x.double())).flatten(1).norm(dim=1)
    bound = p * x.double().flatten(1).norm(dim=1) + q
    assert (err <= bound).all()
    assert (err > 0).any()  # the test is not vacuous


def test_residual_in_gloronet_certifies():
    torch.manual_seed(5)
    f = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        tg.MinMax(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), tg.MinMax())),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    net = tg.GloroNet(f, 0.05, in_shape=(1, 6, 6))
    x = torch.randn(5, 1, 6, 6)
    net.train()
    net(x).sum().backward()
    cs, cf = net.certify(x), net.certify(x, mode="fast")
    assert (cs.radius <= cf.radius * 1.001 + 1e-12).all()


# ---- LLNLinear -------------------------------------------------------------------------------


def test_lln_rows_unit_norm_and_forward():
    head = LLNLinear(8, 5, scale=2.0)
    with torch.no_grad():
        head.weight.mul_(torch.arange(1.0, 6.0).view(-1, 1))
    w = head.effective_weight()
    torch.testing.assert_close(w.norm(dim=1), torch.full((5,), 2.0))
    x = torch.randn(3, 8)
    torch.testing.assert_close(head(x), x @ w.t() + head.bias)
    assert "scale" in dict(head.named_buffers())
    learn = LLNLinear(8, 5, learn_scale=True, bias=False)
    assert "scale" in dict(learn.named_parameters()) and learn.bias is None


def test_lln_bound_mid_network():
    head = LLNLinear(6, 4, scale=1.5)
    b = bound_for(head, (6,))
    assert isinstance(b, LLNLinearBound)
    svd = torch.linalg.matrix_norm(head.effective_weight().double(), ord=2).item()
    assert b.converge(tol=1e-7).item() == pytest.approx(svd, rel=1e-4)
    assert svd <= b.sound() <= svd * (1 + 1e-6)
    assert _max_ratio(head, (6,)) <= b.sound()
    b.estimate(differentiable=True).backward()
    assert head.weight.grad is not None


def test_lln_head_in_gloronet_uses_normalized_rows():
    f = nn.Sequential(nn.Linear(6, 8), tg.MinMax(), LLNLinear(8, 3, scale=1.0))
    net = tg.GloroNet(f, 0.1, in_shape=(6,)).eval()
    assert len(net.bounds) == 2  # the head is not among the bounds
    K = net.lipschitz_constant("fast")
    w = f[2].effective_weight().detach()
    k_pen = net.bounds[0].converge().item()
    torch.testing.assert_close(K, torch.cdist(w, w) * k_pen, rtol=1e-3, atol=1e-5)
    assert (K <= 2.0 * k_pen * 1.001).all()  # unit rows: ‖w_i − w_j‖ ≤ 2
    Ks = net.lipschitz_constant("sound")
    off = ~torch.eye(3, dtype=torch.bool)
    assert (Ks[off] >= K.double()[off] * (1 - 1e-4)).all()
    x = torch.randn(4, 6)
    assert net.certify(x).logits.shape == (4, 3)


def test_bounds_survive_module_dtype_and_device_moves():
    """``nn.Module.to()`` (used by ``tg.load``) must work on these bound modules."""
    for layer, shape in (
        (LiResBlock(4), (4, 5, 5)),
        (LLNLinear(6, 3), (6,)),
        (Residual(nn.Sequential(tg.MinMax())), (4,)),
    ):
        b = bound_for(layer, shape)
        b.to("cpu")
        b.double()
        b.float()


def test_estimate_graph_survives_later_iterations():
    """A differentiable estimate stays valid after more power iterations (two forwards)."""
    blk = LiResBlock(4)
    b = bound_for(blk, (4, 5, 5))
    est = b.estimate(differentiable=True)
    b.estimate(n_iter=3)
    est.backward()
    assert blk.conv.weight.grad is not None


def test_liresblock_euler_estimate_matches_autograd():
    blk = LiResBlock(4, 3, residual_scale=0.5, affine=True).double()
    b = bound_for(blk, (4, 6, 6))
    b.estimate(n_iter=30)
    grads = []
    for native in (False, True):
        b._native_cpu = native
        blk.zero_grad(set_to_none=True)
        b.estimate(differentiable=True).backward()
        grads.append([p.grad.clone() for p in (blk.conv.weight, blk.scale)])
    for ref, new in zip(*grads):
        assert torch.allclose(new, ref, rtol=1e-10, atol=1e-14) and float(ref.abs().sum()) > 0


def test_residual_covers_underflow_amplified_inside_the_block():
    """Inside Residual(Linear(2^-140) → Linear(1e38)) the one inner product underflows to 0
    in float64 and is then scaled by 1e38: the exact logits favour class 0, float64's class 1.
    The block's round-off terms used to add the subnormal allowance once, after the gain."""
    from fractions import Fraction

    l1, l2, head = (nn.Linear(2, 2, bias=False) for _ in range(3))
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[2.0**-140, 0.0], [0.0, 0.0]]))
        l2.weight.copy_(torch.tensor([[0.0, 0.0], [1e38, 0.0]]))
        d = -1e38 * 3.6e-5
        head.weight.copy_(torch.tensor([[d, 1e38], [-d, -1e38]]))
    net = tg.GloroNet(nn.Sequential(tg.Residual(nn.Sequential(l1, l2)), head), 1.0, (2,))
    x = torch.tensor([[0.4 * 2.0**-934, 0.0]], dtype=torch.float64)

    def mv(w, v):
        return [sum(Fraction(a) * b for a, b in zip(row, v)) for row in w.double().tolist()]

    xv = [Fraction(v) for v in x[0].tolist()]
    z = [a + b for a, b in zip(xv, mv(l2.weight, mv(l1.weight, xv)))]
    exact = mv(head.weight, z)
    assert exact[0] > exact[1]  # class 0
    cert = net.eval().certify(x, 1e-300)
    assert int(cert.pred[0]) == 1  # float64 went wrong, as constructed
    assert not bool(cert.certified[0])
