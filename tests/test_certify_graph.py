"""Float32-first sound certification of traced graph backbones (docs/soundness.md §14b)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgloro as tg
from torchgloro import margins
from torchgloro._certify import (
    _graph_float32_pass,
    _head_error,
    _norm_upper,
    _pair_slack,
    strict_fp32,
)
from torchgloro._net_attributes import eval_mode
from torchgloro.nn.layers import Residual


class AddCat(nn.Module):
    """A residual add and a concatenation of two branches, ReLU only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Linear(64, 12)
        self.b = nn.Linear(64, 12)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.max_pool2d(h + F.relu(self.c1(h)), 2)
        z = torch.flatten(h, 1)
        return self.fc(torch.cat([F.relu(self.a(z)), self.b(z) - z[:, :12]], dim=1))


class BnGelu(nn.Module):
    """BatchNorm in eval mode, GELU, a residual add and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Linear(256, 10)
        self.b = nn.Linear(256, 10)
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        h = F.gelu(self.bn(self.stem(x)))
        h = h + F.gelu(self.c1(h))
        z = torch.flatten(h, 1)
        return self.fc(torch.cat([F.gelu(self.a(z)), self.b(z)], dim=1))


NETS = {"add_cat": AddCat, "bn_gelu": BnGelu}


def _net(name: str, seed: int = 0, scale: float = 1.0) -> tg.GloroNet:
    torch.manual_seed(seed)
    model = NETS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.bias.uniform_(-0.2, 0.2)
        for p in model.parameters():
            p.mul_(scale)
    return tg.GloroNet(model, 0.1, in_shape=(1, 8, 8)).eval()


def _allowances(net, x, j: int):
    """Float32 logits and the (B, C) margin allowances of class j: a priori, per point."""
    st = net._sound_state()
    graph = st.graph32
    with torch.no_grad(), eval_mode(net), strict_fp32():
        y, norms = _graph_float32_pass(net.backbone, graph, x)
    x_norm = _norm_upper(x)
    r = _head_error(st.head32, norms.get(graph.out, x_norm))
    jj = torch.full((len(x),), j, dtype=torch.long)
    prior = _pair_slack(st.head32, jj, st.pen32[0] * x_norm + st.pen32[1], r)
    err = graph.measured_error(norms, x_norm, margins.UNIT_ROUNDOFF_F32)
    return y, prior, _pair_slack(st.head32, jj, err, r)


@pytest.mark.parametrize("name", sorted(NETS))
def test_float32_allowance_covers_the_float32_error_of_every_pair(name):
    """Weights scaled up until float32 round-off is visible: each margin's error stays within
    both allowances, the logits' within err32 and every value within peak32."""
    net = _net(name, seed=3, scale=3.0)
    st = net._sound_state()
    assert st.graph32 is not None and st.err32 is not None
    x = torch.rand(64, 1, 8, 8) * 5
    with torch.no_grad(), strict_fp32():
        y32 = net.backbone(x).double()
    y64 = st.backbone64(x.double())  # within ~1e-10 of the exact logits (test_sound.py)
    x_norm = x.flatten(1).double().norm(dim=1)
    err = (y32 - y64).norm(dim=1)
    assert float(err.max()) > 0
    assert bool((err <= st.err32[0] * x_norm + st.err32[1]).all())
    assert bool((y64.abs().amax(dim=1) <= st.peak32[0] * x_norm + st.peak32[1]).all())
    for j in range(y32.shape[1]):
        y_pass, prior, post = _allowances(net, x, j)
        assert torch.equal(y_pass, y32)  # the recording pass is the backbone's own forward
        off = (y32[:, j : j + 1] - y32) - (y64[:, j : j + 1] - y64)  # (B, C) margin errors
        assert float(off.abs().max()) > 0
        assert bool((off.abs() <= post).all()) and bool((off.abs() <= prior).all())
        assert float((post / prior).median()) < 0.9  # measured norms: tighter


@pytest.mark.parametrize("name", sorted(NETS))
def test_auto_certifies_exactly_the_float64_points(name, monkeypatch):
    """At radii spread over the float64 radii and within 1e-6 of some of them,
    precision="auto" certifies the very points float64 does, deciding most in float32. At
    exactly a float64 radius, float32 may also prove that point (its radius may exceed
    float64's by twice float64's own allowance over K, ~1e-10 relative): never another."""
    net = _net(name, seed=1)
    x = torch.rand(200, 1, 8, 8)
    r64 = net.certify(x, precision="float64").radius
    st = net._sound_state()
    rows = []
    f64 = st.backbone64
    monkeypatch.setattr(st, "backbone64", lambda z: (rows.append(len(z)), f64(z))[1])
    spread = torch.quantile(r64, torch.tensor([0.2, 0.5, 0.8], dtype=r64.dtype)).tolist()
    at = [float(r64[k]) * s for k in range(3) for s in (1 - 1e-6, 1.0, 1 + 1e-6)]
    for eps in [*spread, *(e for e in at if e > 0)]:
        rows.clear()
        auto = net.certify(x, eps)
        assert auto.precision == "float32" and sum(rows) < len(x) // 2
        ref = net.certify(x, eps, precision="float64")
        extra = auto.certified & ~ref.certified
        assert bool((ref.radius[extra] >= eps * (1 - 1e-9)).all())
        assert bool((auto.certified | ~ref.certified).all())  # every float64 point
        if eps not in (float(r64[k]) for k in range(3)):
            assert torch.equal(auto.certified, ref.certified)
        if eps in spread:  # a non-trivial split
            assert 0 < int(ref.certified.sum()) < len(x)
        assert torch.equal(auto.pred[auto.certified], ref.pred[auto.certified])
        assert bool((auto.radius <= ref.radius + 1e-12).all())


def test_a_node_without_a_float32_model_sends_the_graph_to_float64():
    """A Residual module folds float64's unit round-off into its terms: float64 throughout."""

    class WithResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.r = Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU()))
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(torch.cat([self.r(x), x], 1))

    net = tg.GloroNet(WithResidual(), 0.1, in_shape=6).eval()
    assert net._sound_state().err32 is None
    assert net.certify(torch.randn(4, 6)).precision == "float64"


def test_head_on_the_input_itself():
    """A graph whose head reads the input directly (no rounding before it)."""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x.view(x.size(0), -1))

    net = tg.GloroNet(Direct(), 0.01).eval()
    x = torch.randn(50, 6)
    auto, ref = net.certify(x), net.certify(x, precision="float64")
    assert auto.precision == "float32" and torch.equal(auto.certified, ref.certified)


class _BnHead(nn.Module):
    """x ↦ fc(bn(lin(x))): one BatchNorm channel between two linear maps."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.fc = nn.Linear(1, 1), nn.BatchNorm1d(1), nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(self.bn(self.lin(x)))


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "sequential"])
def test_a_variance_that_cancels_eps_never_certifies_the_wrong_class(graph):
    """running_var one float32 ulp above −fl32(eps): var + eps is 1.2e-12 exactly but 9.1e-13
    in the float32 kernel (eps rounded to float32 first), so float32's logit 1048576 beats
    the bias 1e6 where the exact one, 927631, loses to it. Until 2026-12-08 `auto` certified
    class 0 (radius 0.05 at ε = 0.01); float64 certifies class 1."""
    m = _BnHead()
    eps32 = float(torch.tensor(m.bn.eps, dtype=torch.float32))
    with torch.no_grad():
        m.lin.weight.fill_(1.0)
        m.lin.bias.zero_()
        m.bn.running_var.fill_(-eps32 + 2.0**-40)  # 2^-40: float32's ulp at 1e-5
        m.bn.running_mean.zero_()
        m.fc.weight.copy_(torch.tensor([[1.0], [0.0]]))
        m.fc.bias.copy_(torch.tensor([0.0, 1e6]))
    model = m if graph else nn.Sequential(m.lin, m.bn, m.fc)
    net = tg.GloroNet(model, 0.01, in_shape=(1,)).eval()
    x = torch.ones(1, 1)
    exact = net.certify(x, precision="float64")
    assert exact.pred.tolist() == [1] and exact.certified.tolist() == [True]
    cert = net.certify(x)
    assert cert.pred.tolist() == [1] and cert.certified.tolist() == [True]


def test_building_a_net_leaves_batchnorm_statistics_alone():
    """The shape trace ran a user's nn.Sequential in training mode: a BatchNorm folded the
    dummy batch into its running statistics (mean 5 → 4.5, var 7 → 6.3) while building."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        seq[1].running_mean.fill_(5.0)
        seq[1].running_var.fill_(7.0)
    state = {k: v.clone() for k, v in seq.state_dict().items()}
    tg.GloroNet(seq, 0.1, in_shape=(3,))
    assert seq.training  # the user's mode is kept
    for k, v in seq.state_dict().items():
        assert torch.equal(v, state[k]), k


class _Extreme(nn.Module):
    """BatchNorm with extreme running statistics, every smooth activation, Python constants,
    a residual add and a concatenation (the attack review's stress net)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Linear(4, 16), nn.BatchNorm1d(16)
        self.l1, self.bn2 = nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.a, self.b, self.fc = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(24, 6)

    def forward(self, x):
        h = F.gelu(self.bn(self.stem(x)))
        h = h + F.silu(F.leaky_relu(self.bn2(self.l1(h)), 0.3)) * 0.7
        z = torch.cat([torch.tanh(self.a(h)), F.hardtanh(self.b(h) - 0.3, -0.7, 0.9), h[:, :8]], 1)
        return self.fc(F.elu(z))


def test_stress_net_with_extreme_batchnorm_statistics():
    """Running means up to ~1e4, variances down to 1e-7, weights scaled 5×: both allowances
    cover every margin's float32 error, and `auto` certifies no point float64 does not."""
    torch.manual_seed(7)
    m = _Extreme()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5.0)
        for bn in (m.bn, m.bn2):
            bn.running_mean.copy_(torch.randn(16) * 1e4)
            bn.running_var.copy_(10 ** torch.empty(16).uniform_(-7, 2))
            bn.weight.copy_(torch.randn(16) * 1e-3)
    net = tg.GloroNet(m, 0.1, in_shape=(4,)).eval()
    assert net._sound_state().graph32 is not None
    x = torch.randn(256, 4) * 30
    y64 = net._sound_state().backbone64(x.double())
    for j in range(6):
        y, prior, post = _allowances(net, x, j)
        off = ((y[:, j : j + 1] - y) - (y64[:, j : j + 1] - y64)).abs()
        assert float(off.max()) > 0
        assert bool((off <= post).all()) and bool((off <= prior).all())
    r64 = net.certify(x, precision="float64").radius
    for eps in torch.quantile(r64, torch.tensor([0.3, 0.6, 0.9], dtype=r64.dtype)).tolist():
        auto, ref = net.certify(x, eps), net.certify(x, eps, precision="float64")
        assert 0 < int(auto.certified.sum())
        assert bool((ref.radius[auto.certified] >= eps * (1 - 1e-9)).all())
        assert torch.equal(auto.pred[auto.certified], y64.argmax(1)[auto.certified])
