"""Users' own models (#27): graph capture, optional in_shape, and the "Done when" examples.

Each example net is checked two ways: a gradient-ascent lower bound on every margin's
Lipschitz constant never exceeds the proven K_ji, and PGD inside ε never flips a certified
point.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgloro as tg
from torchgloro._errors import InputShapeError
from torchgloro.evaluate.attacks import pgd_l2


class SmallResNet(nn.Module):
    """A residual block in a custom forward, F.relu, a scaled branch, adaptive pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + 0.5 * self.c2(F.relu(self.c1(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


class TwoBranches(nn.Module):
    """Two branches concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.a(x)), self.b(x)], dim=1))


class ModernMLP(nn.Module):
    """GELU, Dropout, LeakyReLU and Tanh, as modules and as functions."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(F.gelu(self.l1(x)))
        h = F.leaky_relu(self.l2(h), 0.1)
        return self.fc(torch.tanh(self.l3(h)))


class ViewNet(nn.Module):
    """A forward that flattens with ``.view``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def conv_bn() -> nn.Module:
    """A conv net with BatchNorm (random running statistics, evaluated in eval mode)."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net


EXAMPLES = {
    "resnet": (SmallResNet, (1, 8, 8)),
    "two_branches": (TwoBranches, (6,)),
    "mlp": (ModernMLP, (6,)),
    "view": (ViewNet, (1, 8, 8)),
    "conv_bn": (conv_bn, (1, 8, 8)),
}


def _margin_lipschitz_lower(f: nn.Module, shape, j: int, i: int, steps: int = 15) -> float:
    """max ‖∇(f_j − f_i)‖ over random points pushed up by gradient ascent (a lower bound)."""
    gen = torch.Generator().manual_seed(j * 7 + i)
    x = torch.randn((128, *shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    best = 0.0
    for _ in range(steps):
        y = f(x)
        (g,) = torch.autograd.grad((y[:, j] - y[:, i]).sum(), x, create_graph=True)
        norms = g.flatten(1).norm(dim=1)
        best = max(best, float(norms.detach().max()))
        (step,) = torch.autograd.grad(norms.sum(), x, allow_unused=True)
        if step is None:  # piecewise-linear: the gradient is locally constant
            break
        x = (
            (
                x
                + 0.5
                * step
                / step.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(shape))
            )
            .detach()
            .requires_grad_(True)
        )  # noqa: E501
    return best


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_margin_lipschitz_below_K(name):
    torch.manual_seed(0)
    make, shape = EXAMPLES[name]
    net = tg.GloroNet(make(), epsilon=0.1, example_input=torch.zeros(1, *shape)).eval()
    K = net.lipschitz_constant("sound")
    f64 = net._sound_state().backbone64  # the float64 copy that certification runs
    for j in range(3):
        for i in range(3):
            if i != j:
                low = _margin_lipschitz_lower(f64, shape, j, i)
                assert 0 < low <= float(K[j, i]), (name, j, i, low, float(K[j, i]))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_pgd_never_flips_a_certified_point(name):
    torch.manual_seed(1)
    make, shape = EXAMPLES[name]
    net = tg.GloroNet(make(), epsilon=0.1)  # the shape is fixed by the first batch
    x = torch.randn(64, *shape)
    net.eval()(x)
    assert net.in_shape == shape
    eps = float(net.certify(x).radius.median()) * 0.98  # about half the points certify
    cert = net.certify(x, epsilon=eps)
    c = cert.certified
    assert 0 < int(c.sum()) < 64
    res = pgd_l2(net.backbone, x[c], cert.pred[c], eps, steps=40, restarts=2, clip=None)
    assert not bool(res.fooled.any())
    # The attack is not toothless: at a larger radius it flips some of those points.
    flips = [pgd_l2(net.backbone, x[c], cert.pred[c], m * eps, steps=40, clip=None).fooled
             for m in (3, 10, 30)]  # fmt: skip
    assert any(bool(f.any()) for f in flips)


def test_example_trains_on_its_graph():
    torch.manual_seed(2)
    net = tg.GloroNet(SmallResNet(), epsilon=0.1, in_shape=(1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = tg.GloroCrossEntropy()
    net.train()
    loss = loss_fn(net(x), y)
    loss.backward()
    assert net.backbone.c1.weight.grad.abs().sum() > 0  # the bound's gradient reaches weights
    opt.step()
    net.eval()
    fast, sound = net.lipschitz_constant("fast"), net.lipschitz_constant("sound")
    off = ~torch.eye(3, dtype=torch.bool)
    # The converged estimate is below the proof, and within the proofs' looseness of it.
    assert (fast[off].double() <= sound[off] * (1 + 1e-6)).all()
    assert (fast[off].double() >= 0.9 * sound[off]).all()


# ---- in_shape ---------------------------------------------------------------------------------


def test_in_shape_from_a_first_linear():
    net = tg.GloroNet(nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2)), epsilon=0.1)
    assert net.in_shape == (2,)
    assert tg.GloroNet(TwoBranches(), 0.1).in_shape is None  # two layers read the input
    assert tg.GloroNet(ModernMLP(), 0.1).in_shape == (6,)


def test_in_shape_int_and_bad_values():
    net = tg.GloroNet(nn.Sequential(nn.Linear(2, 2)), 0.1, in_shape=2)
    assert net.in_shape == (2,)
    for bad in ((0, 3), "abc", (1.5,)):
        with pytest.raises(tg.GloroInputError, match="in_shape must be"):
            tg.GloroNet(nn.Sequential(nn.Linear(2, 2)), 0.1, in_shape=bad)


def test_bounds_before_the_shape_is_known_raise_clearly():
    net = tg.GloroNet(ViewNet(), 0.1)
    assert net.in_shape is None
    for call in (net.lipschitz_constant, net.refresh):
        with pytest.raises(InputShapeError, match="does not know its input shape yet"):
            call()
    net.eval()(torch.zeros(2, 1, 8, 8))
    assert net.in_shape == (1, 8, 8)
    with pytest.raises(tg.GloroInputError, match=r"Expected input of shape \(B, 1, 8, 8\)"):
        net(torch.zeros(2, 1, 6, 6))


# ---- a graph net is a GloroNet like any other --------------------------------------------------


def test_graph_net_deploys_saves_loads_and_copies(tmp_path):
    import copy
    import pickle

    torch.manual_seed(3)
    net = tg.GloroNet(SmallResNet(), 0.1, in_shape=(1, 8, 8)).eval()
    x = torch.randn(8, 1, 8, 8)
    cert = net.certify(x)
    deployed = tg.deploy(net)
    assert torch.allclose(deployed(x)[:, :3], net(x)[:, :3])
    net.save(tmp_path / "net")
    loaded = tg.load(tmp_path / "net", backbone=SmallResNet())
    assert torch.equal(loaded.certify(x).radius, cert.radius)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert torch.equal(other.certify(x).radius, cert.radius)
    with pytest.raises(tg.UnsupportedLayerError, match="an add or a concatenation") as e:
        net.certify(x, fallback="local")
    assert "without fallback='local'" in str(e.value) and "Residual" in str(e.value)


def test_graph_net_refuses_a_changed_layer():
    net = tg.GloroNet(SmallResNet(), 0.1, in_shape=(1, 8, 8))
    net.backbone.c1.padding = (0, 0)
    with pytest.raises(tg.GloroInputError, match="changed after this GloroNet was built"):
        net.certify(torch.randn(2, 1, 8, 8))


def test_sequential_with_softplus_certifies_on_float64():
    """Softplus's jump at its threshold is an absolute error: float64 only (Tanh: float32)."""
    torch.manual_seed(4)
    net = tg.GloroNet(nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3)), 0.1).eval()
    assert not isinstance(net.backbone, torch.fx.GraphModule)  # the fast path
    assert net.certify(torch.randn(5, 4)).precision == "float64"
    tanh = tg.GloroNet(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), 0.1).eval()
    assert tanh.certify(torch.randn(5, 4)).precision == "float32"
    relu = tg.GloroNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 0.1).eval()
    assert relu.certify(torch.randn(5, 4)).precision == "float32"


def test_sequential_with_a_custom_module_is_traced():
    class Double(nn.Module):
        def forward(self, x):
            return x + x

    net = tg.GloroNet(nn.Sequential(nn.Linear(4, 4), Double(), nn.Linear(4, 3)), 0.1)
    assert isinstance(net.backbone, torch.fx.GraphModule)
    gm = net.backbone
    plain = tg.GloroNet(nn.Sequential(gm.get_submodule("0"), gm.get_submodule("2")), 0.1)
    # x + x: bounds add, so the margins' K doubles
    ratio = net.lipschitz_constant() / plain.lipschitz_constant()
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(ratio[off], torch.full_like(ratio[off], 2.0), rtol=1e-12)


def test_parametrized_layers_end_to_end():
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(6)
    model = nn.Sequential(
        P.orthogonal(nn.Linear(4, 8)), nn.ReLU(), P.spectral_norm(nn.Linear(8, 8)), nn.ELU(),
        nn.Linear(8, 3),
    )  # fmt: skip
    net = tg.GloroNet(model, 0.1)
    assert net.in_shape == (4,)  # from the parametrized first Linear
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    net.train()
    tg.GloroCrossEntropy()(net(x), y).backward()
    net.eval()
    K = net.lipschitz_constant()
    w = net.backbone.get_submodule("4").weight.detach().double()
    # orthogonal: 1; spectral_norm: about 1; ELU: 1; so K_ji ≈ ‖w_j − w_i‖
    assert torch.allclose(K[0, 1], (w[0] - w[1]).norm(), rtol=0.05)
    cert = net.certify(x, epsilon=1e-3)
    assert cert.certified.any()
