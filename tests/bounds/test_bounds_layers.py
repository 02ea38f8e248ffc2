"""The bounds of #27's layers against the exact operator norm or the exact maximum slope."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import torchgloro as tg
from torchgloro.bounds.capture import make_bound
from torchgloro.bounds.elementwise import gelu_max_slope, silu_max_slope


def _jacobian_norm(layer: nn.Module, shape) -> float:
    """The exact ℓ2 operator norm of the layer's linear part (dense float64 Jacobian)."""
    layer = layer.double().eval()
    x = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        J = torch.autograd.functional.jacobian(lambda z: layer(z).flatten(1), x)
    return float(torch.linalg.matrix_norm(J.reshape(-1, x.numel()), 2))


def _batchnorm(cls, c):
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize(
    "make, shape, tight",
    [
        (lambda: _batchnorm(nn.BatchNorm2d, 3), (3, 4, 4), 1e-12),
        (lambda: _batchnorm(nn.BatchNorm1d, 5), (5,), 1e-12),
        (lambda: _batchnorm(nn.BatchNorm1d, 5), (5, 7), 1e-12),
        (lambda: nn.AdaptiveAvgPool2d(1), (2, 5, 5), 1e-9),
        (lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5), 1e-9),  # overlapping windows
        (lambda: nn.AdaptiveAvgPool2d((None, 3)), (1, 4, 8), 1e-9),
        (lambda: nn.AvgPool2d(3, 2, padding=1), (1, 7, 7), 1e-2),
        (lambda: nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), (1, 6, 6), 1e-9),
        (lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 10), 1e-2),
        (lambda: nn.Conv1d(2, 4, 4, stride=2, dilation=2, padding="valid"), (2, 15), 1e-2),
        (lambda: nn.Conv1d(4, 4, 3, padding="same", groups=2), (4, 9), 1e-2),
        (
            lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
            (3, 4, 4),
            1e-2,
        ),
        (lambda: nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), (4, 3, 3), 1e-2),
        (lambda: nn.ConvTranspose2d(2, 3, 3, dilation=2), (2, 5, 4), 1e-2),
    ],
)
def test_linear_layers_against_the_dense_jacobian(make, shape, tight):
    torch.manual_seed(0)
    layer = make()
    bound = make_bound(layer, shape)
    sound = bound.sound()
    exact = _jacobian_norm(layer, shape)
    assert exact * (1 - 1e-12) <= sound <= exact * (1 + tight)
    layer.float()
    if hasattr(bound, "u"):  # power iteration converges to the exact norm from below
        assert float(bound.converge()) == pytest.approx(exact, rel=1e-3)
    n, abs_norm, b = bound.fp_terms()
    assert n >= 1 and abs_norm >= exact * (1 - 1e-12) * (0.0 if "Conv" in str(layer) else 1)


def test_batchnorm_bound_is_differentiable_and_refuses_batch_statistics():
    bn = _batchnorm(nn.BatchNorm2d, 3)
    est = make_bound(bn, (3, 2, 2)).estimate(differentiable=True)
    est.backward()
    assert bn.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="track_running_stats"):
        make_bound(nn.BatchNorm2d(3, track_running_stats=False), (3, 2, 2))


def _max_slope(f, lo=-30.0, hi=30.0, n=3_000_001) -> float:
    z = torch.linspace(lo, hi, n, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(z).sum(), z)
    return float(g.abs().max())


@pytest.mark.parametrize(
    "layer",
    [
        nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.SiLU(), nn.ELU(), nn.ELU(alpha=1.7),
        nn.LeakyReLU(0.1), nn.LeakyReLU(-1.5), nn.Softplus(), nn.Softplus(beta=3.0),
        nn.Hardtanh(), nn.ReLU6(), nn.Dropout(0.3),
    ],
)  # fmt: skip
def test_activation_bound_is_the_exact_max_slope(layer):
    bound = make_bound(layer, (4,)).sound()
    slope = _max_slope(layer.eval())
    assert slope <= bound <= slope + 1e-6


def test_gelu_and_silu_closed_forms():
    assert gelu_max_slope() == pytest.approx(1.1289, abs=1e-4)
    assert gelu_max_slope() >= 0.5 * (1 + math.erf(1)) + 1 / (math.e * math.sqrt(math.pi))
    assert silu_max_slope() == pytest.approx(1.0998, abs=1e-4)


def test_exact_and_approximate_activations():
    assert make_bound(nn.Hardtanh(), (4,)).fp_terms() is None  # exact
    with pytest.raises(TypeError, match="approximate"):
        make_bound(nn.GELU(approximate="tanh"), (4,))


@pytest.mark.parametrize("param", ["orthogonal", "spectral_norm"])
def test_parametrized_layers(param):
    torch.manual_seed(1)
    layer = getattr(parametrizations, param)(nn.Linear(6, 5))
    bound = make_bound(layer, (6,))
    for _ in range(3):  # spectral_norm: the parametrization's own iteration runs in training
        layer.train()(torch.randn(2, 6))
    sound = bound.sound()
    with torch.no_grad():
        exact = float(torch.linalg.matrix_norm(layer.eval().weight.double(), 2))
    assert exact * (1 - 1e-12) <= sound <= exact * (1 + 1e-9)
    assert sound == pytest.approx(1.0, rel=1e-2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.train()
    assert bound.sound() == sound  # the proof reads the eval-mode weight ...
    after = layer.state_dict()  # ... and leaves spectral_norm's own iteration alone
    assert all(torch.equal(v, after[k]) for k, v in state.items())


class _Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


@pytest.fixture
def registered_scale():
    """Registers a user's bound for ``_Scale`` for one test (exactness claimed by a flag)."""
    from torchgloro.bounds.registry import _REGISTRY, ConstantBound

    claim = {"exact": True}

    @tg.register_bound(_Scale)
    def _bound(module, in_shape):
        c = abs(module.c)
        return ConstantBound(c, "Scale", fp_terms=None if claim["exact"] else (1, c, 0.0))

    yield claim
    del _REGISTRY[_Scale]


def test_a_users_bound_that_claims_exact_arithmetic_is_checked(registered_scale):
    def net(c):
        return tg.GloroNet(nn.Sequential(nn.Linear(3, 3), _Scale(c), nn.Linear(3, 2)), 0.1)

    net(2.0)  # ×2 is exact in floating point: the claim holds
    with pytest.raises(tg.UnsupportedLayerError, match="claims exact arithmetic"):
        net(3.0)  # ×3 rounds
    registered_scale["exact"] = False  # with its round-off terms it is accepted
    k = net(3.0).lipschitz_constant()
    assert torch.isfinite(k).all()


class _Gain(nn.Module):
    """A user's module with an extra argument: its registered bound is for gain 1."""

    def forward(self, x, gain=1.0):
        return gain * x


class _GainModel(nn.Module):
    def __init__(self, gain: float | None) -> None:
        super().__init__()
        self.a, self.g, self.fc, self.gain = nn.Linear(3, 3), _Gain(), nn.Linear(3, 2), gain

    def forward(self, x):
        h = self.a(x)
        return self.fc(self.g(h) if self.gain is None else self.g(h, self.gain))


def test_a_registered_module_called_with_extra_arguments_is_refused():
    """Found by the graph-capture review: g(h, 10.0) got the bound registered for g(h)."""
    from torchgloro.bounds.registry import _REGISTRY, ConstantBound

    tg.register_bound(_Gain)(lambda m, s: ConstantBound(1.0, "Gain", fp_terms=(1, 1.0, 0.0)))
    try:
        with pytest.raises(tg.UnsupportedLayerError, match="arguments besides its input"):
            tg.GloroNet(_GainModel(10.0), 0.1)
        net = tg.GloroNet(_GainModel(None), 0.1)  # called on its input alone: bounded
        assert torch.isfinite(net.lipschitz_constant()).all()
    finally:
        del _REGISTRY[_Gain]


def test_batchnorm_round_off_model_holds_in_float32():
    """|BN₃₂(z) − BN(z)| ≤ γ₈(|α||z| + |β| + |αμ|) per entry, at float32's u: the model is
    precision-free (float64's values, off by the same model at float64's u, as reference)."""
    from torchgloro.margins import UNIT_ROUNDOFF_F32, UNIT_ROUNDOFF_F64, gamma

    torch.manual_seed(0)
    bn = _batchnorm(nn.BatchNorm2d, 8).eval()
    with torch.no_grad():
        bn.weight.uniform_(-3, 3)
        bn.bias.uniform_(-2, 2)
        bn.running_mean.mul_(100)
    bound = make_bound(bn, (8, 4, 4))
    assert bound.fp_terms_precision_free
    z = torch.randn(512, 8, 4, 4) * 50
    with torch.no_grad():
        err = (bn(z).double() - bn.double()(z.double())).abs()
        bn.float()
        a = bn.weight.double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double().abs() + a * bn.running_mean.double().abs()
    scale = a[:, None, None] * z.double().abs() + shift[:, None, None]
    allowed = (gamma(8, UNIT_ROUNDOFF_F32) - gamma(8, UNIT_ROUNDOFF_F64)) * scale * (1 - 1e-6)
    assert float(err.max()) > 0 and bool((err <= allowed).all())


def _bn_error_and_allowance(bn: nn.BatchNorm1d, z: torch.Tensor):
    """Per-sample ‖BN₃₂(z) − BN(z)‖ (float64's values as reference, off by at most the model
    at float64's u) and the model's float32 allowance γ₈(A‖z‖ + b) from ``fp_terms``."""
    from torchgloro.margins import UNDERFLOW_F32, UNIT_ROUNDOFF_F32, UNIT_ROUNDOFF_F64, gamma

    n, A, b = make_bound(bn, tuple(z.shape[1:])).fp_terms()
    with torch.no_grad():
        y32 = bn(z).double()
        y64 = copy.deepcopy(bn).double()(z.double())
    err = (y32 - y64).flatten(1).norm(dim=1)
    zn = z.double().flatten(1).norm(dim=1)
    g = gamma(n, UNIT_ROUNDOFF_F32) - gamma(n, UNIT_ROUNDOFF_F64)
    return err, g * (A * zn + b) + UNDERFLOW_F32


def _bn1(var: float, eps: float = 1e-5, weight: float = 1.0, mean: float = 0.0):
    bn = nn.BatchNorm1d(1, eps=eps)
    with torch.no_grad():
        bn.running_var.fill_(var)
        bn.running_mean.fill_(mean)
        bn.weight.fill_(weight)
        bn.bias.zero_()
    return bn.eval()


def test_batchnorm_variance_that_cancels_eps_is_float64_only():
    """A negative running variance with var + eps > 0: float32 adds eps rounded to float32,
    and the sum cancels (exact 1.2e-12, float32 9.1e-13: a 13% error in the output, the
    model's γ₈ is 5e-7), so the layer has no float32 model; float64 is exact enough."""
    eps32 = float(torch.tensor(1e-5, dtype=torch.float32))
    var = -eps32 + float(torch.finfo(torch.float32).eps) * 2**-17 * 2  # one float32 ulp up
    bn = _bn1(var)
    err, allowed = _bn_error_and_allowance(bn, torch.ones(1, 1))
    assert float(err[0]) > 1000 * float(allowed[0])  # the float32 kernel is far off
    assert not make_bound(bn, (1,)).fp_terms_precision_free
    assert make_bound(_bn1(0.5), (1,)).fp_terms_precision_free


def test_batchnorm_subnormal_eps_is_float64_only():
    """eps below float32's normal range rounds by up to 2^-150 absolutely: relative to a
    zero variance plus eps, far more than u."""
    assert not make_bound(_bn1(0.0, eps=3e-44), (1,)).fp_terms_precision_free
    assert make_bound(_bn1(1e-30, eps=3e-44), (1,)).fp_terms_precision_free


def test_batchnorm_variance_plus_eps_not_positive_is_refused():
    with pytest.raises(tg.UnsupportedLayerError, match="running_var"):
        make_bound(_bn1(-1.0), (1,)).sound()


@pytest.mark.parametrize("weight, mean", [(3e-44, 0.0), (1e-38, 5.0), (2e30, 0.0)])
def test_batchnorm_float32_model_covers_subnormal_intermediates(weight, mean):
    """α = w/√(var + eps) below float32's normal range is rounded with an absolute error
    (2^-150) that the next product scales by |z| (CPU: z·α + β); on CUDA (z − μ)·invstd
    may underflow and be scaled by |w|. The model's terms cover both (huge |z| here)."""
    bn = _bn1(1.0, weight=weight, mean=mean)
    z = (
        torch.tensor([[3e35], [-1.7e33], [1e-38], [2.5e-39]])
        if weight < 1
        else torch.tensor([[3e-39], [1.1e-38], [-7e-40]])
    )
    err, allowed = _bn_error_and_allowance(bn, z)
    assert bool((err <= allowed).all()), (err, allowed)
