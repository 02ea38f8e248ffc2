"""Graph composition (#27): the rules, their tightness, the regression against the Sequential
path, the float round-off model through adds and concatenations, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgloro as tg
from torchgloro.bounds import GraphBound, sound
from torchgloro.bounds.capture import capture, make_bound


def _graph_bound(model: nn.Module, in_shape) -> GraphBound:
    gm, _ = capture(model)
    return GraphBound(gm, in_shape, make_bound)


def _net(body, out: int = 6) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(6, 6, bias=False)
            self.v = nn.Linear(6, 6, bias=False)
            self.fc = nn.Linear(out, 3)

        def forward(self, x):
            return self.fc(body(self, x))

    torch.manual_seed(0)
    return Net()


def _exact_norm(f, shape) -> float:
    """The exact operator norm of a linear f (dense float64 Jacobian)."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: f(z).flatten(1), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(J, 2))


@pytest.mark.parametrize(
    "body, out, expected",
    [
        # adding two branches adds their bounds: exact for h + 2h
        (lambda m, x: m.w(x) + 2 * m.w(x), 6, lambda m: 3 * sound.dense_norm_upper(m.w.weight)),
        (
            lambda m, x: m.w(x) - m.v(x),
            6,
            lambda m: sound.dense_norm_upper(m.w.weight) + sound.dense_norm_upper(m.v.weight),
        ),
        # concatenation: root of the sum of squares (exact for [W; W])
        (
            lambda m, x: torch.cat([m.w(x), m.w(x)], 1),
            12,
            lambda m: math.sqrt(2) * sound.dense_norm_upper(m.w.weight),
        ),
        # reshapes are 1; constants scale; x / c is 1/c
        (
            lambda m, x: m.w(x).view(-1, 2, 3).permute(0, 2, 1).reshape(x.size(0), -1) / 4,
            6,
            lambda m: sound.dense_norm_upper(m.w.weight) / 4,
        ),
        (
            lambda m, x: -m.w(x)[:, :4] * 3 + 1.0,
            4,
            lambda m: 3 * sound.dense_norm_upper(m.w.weight),
        ),  # a selection is ≤ 1
    ],
)
def test_composition_rules_and_tightness(body, out, expected):
    net = _net(body, out)
    b = _graph_bound(net, (6,))
    with torch.no_grad():
        exact = _exact_norm(lambda z: body(net.double(), z), (6,))
    net.float()
    bound = b.sound()
    assert bound >= exact * (1 - 1e-12)
    assert bound == pytest.approx(expected(net), rel=1e-9)
    # the power-iteration estimate converges to the same composition
    assert float(b.converge()) == pytest.approx(bound, rel=1e-3)


def test_per_sample_sizes_are_constants():
    net = _net(lambda m, x: m.w(x) * x.shape[1])
    assert _graph_bound(net, (6,)).sound() == pytest.approx(
        6 * sound.dense_norm_upper(net.w.weight), rel=1e-9
    )


def test_branch_bounds_compose_in_a_dag():
    """h = relu(w x); out = cat(h + v h, h): (1 + ‖V‖)‖W‖ and ‖W‖ in squares."""
    net = _net(lambda m, x: torch.cat([F.relu(m.w(x)) + m.v(F.relu(m.w(x))), m.w(x)], 1), 12)
    w, v = sound.dense_norm_upper(net.w.weight), sound.dense_norm_upper(net.v.weight)
    expected = math.sqrt((w * (1 + v)) ** 2 + w**2)
    assert _graph_bound(net, (6,)).sound() == pytest.approx(expected, rel=1e-9)


def test_sequential_and_graph_paths_agree_on_a_registered_model():
    """The paper's architectures: the same K and the same certified points either way."""
    torch.manual_seed(3)
    seq = tg.create_model("2c2f", (1, 12, 12), 10)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq(x)

    fast = tg.GloroNet(seq, 0.1, in_shape=(1, 12, 12)).eval()
    graph = tg.GloroNet(Wrapped(), 0.1, in_shape=(1, 12, 12)).eval()
    assert isinstance(graph.bounds[0], GraphBound) and not isinstance(fast.bounds[0], GraphBound)
    k_fast, k_graph = fast.lipschitz_constant("sound"), graph.lipschitz_constant("sound")
    assert torch.allclose(k_fast, k_graph, rtol=1e-15, atol=0)  # (one more ulp at most)
    x = torch.rand(200, 1, 12, 12)
    eps = float(fast.certify(x).radius.median())
    a, b = fast.certify(x, epsilon=eps), graph.certify(x, epsilon=eps)
    assert 0 < int(a.certified.sum()) < 200
    assert torch.equal(a.certified, b.certified) and torch.equal(a.pred, b.pred)
    ra, rb = fast.certified_radius(x), graph.certified_radius(x)  # both float64
    assert torch.allclose(ra, rb, rtol=1e-9)


class _Mixed(nn.Module):
    """Convolutions, adds, a concatenation, a scale, pooling: everything the model covers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(2, 4, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h + 0.7 * self.c2(h) - self.c3(x)
        z = torch.cat([h, F.relu(self.c3(x))], 1)
        return self.fc(self.pool(z).flatten(1))


def test_roundoff_model_covers_float32_through_adds_and_concatenations():
    """The graph model instantiated for float32 bounds ‖features_f32 − features_f64‖."""
    torch.manual_seed(5)
    model = _Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # gains above 1: errors grow through the graph
    b = _graph_bound(model, (2, 8, 8))
    p, q = b.roundoff(2.0**-24).err
    # The proven chain terms the GloroNet uses carry the same model (float64).
    n, A, bias = b.fp_terms()
    assert n == 1 and A > 0 and bias >= 0
    feats = {}
    model.fc.register_forward_hook(lambda m, i, o: feats.__setitem__(i[0].dtype, i[0]))
    x = torch.randn(32, 2, 8, 8) * 10
    model(x)
    model.double()(x.double())
    err = (feats[torch.float32].double() - feats[torch.float64]).flatten(1).norm(dim=1)
    allowed = p * x.double().flatten(1).norm(dim=1) + q
    assert (err <= allowed).all()
    assert (err >= allowed / 1e4).any()  # the model is not vacuous


def test_graph_nets_certify_float32_first():
    """Graphs decide in float32 first, as Sequential nets do (tests/test_certify_graph.py)."""
    net = tg.GloroNet(_Mixed(), 0.01, in_shape=(2, 8, 8)).eval()
    x = torch.randn(8, 2, 8, 8)
    cert, ref = net.certify(x), net.certify(x, precision="float64")
    assert cert.precision == "float32" and ref.precision == "float64"
    assert torch.equal(cert.certified, ref.certified)


# ---- refusals ------------------------------------------------------------------------------


def _refused(body, match):
    with pytest.raises(tg.UnsupportedLayerError, match=match) as e:
        tg.GloroNet(_net(body), 0.1, in_shape=(6,))
    return str(e.value)


def test_product_of_activations_is_refused_with_its_line():
    msg = _refused(lambda m, x: m.w(x) * m.v(x), "product or quotient of two data-dependent")
    assert "test_bounds_graph.py" in msg and "m.w(x) * m.v(x)" in msg


def test_division_by_data_is_refused():
    _refused(lambda m, x: m.w(x) / m.w(x).norm(dim=1, keepdim=True), "norm|quotient|divid")
    _refused(lambda m, x: 1.0 / m.w(x), "dividing by a data-dependent value")


def test_data_dependent_control_flow_is_refused_with_its_line():
    def body(m, x):
        if x.sum() > 0:  # data-dependent
            return m.w(x)
        return m.v(x)

    with pytest.raises(tg.UnsupportedLayerError, match="control flow") as e:
        tg.GloroNet(_net(body), 0.1, in_shape=(6,))
    assert "test_bounds_graph.py" in str(e.value) and "if x.sum() > 0" in str(e.value)


@pytest.mark.parametrize(
    "body, match",
    [
        (lambda m, x: torch.cat([m.w(x), m.v(x)], 0), "along the batch"),
        (lambda m, x: m.w(x) + m.v(x)[:, :1], "broadcast"),
        (lambda m, x: F.dropout(m.w(x), 0.5, training=True), "nn.Dropout"),
        (lambda m, x: torch.softmax(m.w(x), 1), "no Lipschitz bound is known for this op"),
        (lambda m, x: m.w(x).mean(0, keepdim=True).expand(x.size(0), 6), "batch"),
        (lambda m, x: m.w(x).view(2, -1)[:, :6], "dimension 0"),
        (lambda m, x: m.w(x) * x.size(0), "depends on the batch size"),
        (lambda m, x: m.w(x) * m.w(x), "product or quotient"),
        (lambda m, x: m.w(x).mT.mT, "Cannot bound `getattr`"),
        # bits reinterpreted: was a 1-Lipschitz reshape (fast mode certified on it)
        (lambda m, x: m.w(x).view(torch.int32) * 1.0, "reinterprets the bits"),
        (lambda m, x: m.w(x).view(m.v.weight.int().dtype) + 0.0, "reinterprets"),
        # drops the batch dimension of a batch of 1 (the check runs batches of 2 and 3)
        (lambda m, x: m.w(x).unsqueeze(1).squeeze(), "squeeze without dims"),
        (lambda m, x: torch.squeeze(m.w(x).unsqueeze(1), 0).squeeze(1), "squeeze without dims"),
        # `...` expands to nothing: `:5` sliced the batch (fast mode: 5 certificates for 8 inputs)
        (lambda m, x: m.w(x)[..., :5, :], "may select across the batch"),
    ],
)
def test_ops_without_a_global_bound_are_refused(body, match):
    _refused(body, match)


def _leaky_in_place(h):
    F.leaky_relu(h, 5.0, inplace=True)  # writes 5·h into h's negative entries


def _aliased_iadd(m, x):
    h = m.w(x)
    g = h
    g += m.v(x)  # in place in PyTorch: h changes too
    return h + g


@pytest.mark.parametrize(
    "body, match",
    [
        # an in-place op on a view of h overwrites h, which the head then reads
        (lambda m, x: [h := m.w(x), _leaky_in_place(h.view(x.size(0), -1)), h][2], "overwrites"),
        (lambda m, x: [h := m.w(x), _leaky_in_place(h[:, :]), h][2], "overwrites"),
        (lambda m, x: [h := m.w(x), _leaky_in_place(h.contiguous()), h][2], "overwrites"),
        (lambda m, x: [h := m.w(x), _leaky_in_place(F.dropout(h, 0.5, False)), h][2], "overwrites"),
        # a copy on batches of 2 and 3, a view of h on one input (contiguous there)
        (lambda m, x: [h := m.w(x), _leaky_in_place(h[:, :3].contiguous()), h][2], "overwrites"),
        (lambda m, x: [h := m.w(x), torch.mul(h, 5.0, out=h), h][2], "out="),
        (lambda m, x: [h := m.w(x), torch.cat([m.v(x)[:, :3]] * 2, 1, out=h), h][2], "out="),
        (_aliased_iadd, "overwrites"),
    ],
)
def test_writes_through_an_alias_are_refused(body, match):
    """Each wrote into memory that another branch reads, past the bound: K was 2-5x too small."""
    with pytest.raises(tg.UnsupportedLayerError, match=match):
        tg.GloroNet(_net(body), 0.1, in_shape=(6,))


def test_augmented_assignment_runs_as_the_model_does():
    """``h += y`` stays in place in the graph (fx turned it into ``h = h + y``)."""

    def body(m, x):
        h = m.w(x)
        h += m.v(x)
        h *= 2.0
        h -= 1.0
        h /= 4.0
        return h

    model = _net(body).eval()
    net = tg.GloroNet(model, 0.1, in_shape=(6,))
    x = torch.randn(5, 6)
    torch.testing.assert_close(net.backbone(x), model(x))
    w, v = sound.dense_norm_upper(model.w.weight), sound.dense_norm_upper(model.v.weight)
    assert net.bounds[0].sound() == pytest.approx((w + v) / 2, rel=1e-9)
    assert "+=" in net.backbone.code and "*=" in net.backbone.code


def test_augmented_assignment_on_sizes_stays_a_number():
    def body(m, x):
        n = x.size(1)
        n *= 1  # an int at run time: no in-place method
        return m.w(x).view(x.size(0), n)

    net = tg.GloroNet(_net(body), 0.1, in_shape=(6,))
    assert net(torch.randn(2, 6)).shape == (2, 4)


def test_an_add_with_a_keyword_operand():
    net = _net(lambda m, x: torch.add(m.w(x), other=m.v(x)))
    w, v = sound.dense_norm_upper(net.w.weight), sound.dense_norm_upper(net.v.weight)
    assert _graph_bound(net, (6,)).sound() == pytest.approx(w + v, rel=1e-9)


def test_certify_leaves_the_input_of_an_in_place_graph_alone():
    model = _net(lambda m, x: m.w(F.leaky_relu(x, 5.0, inplace=True)))
    net = tg.GloroNet(model, 0.1, in_shape=(6,))
    x = -torch.rand(4, 6)
    x0 = x.clone()
    for mode in ("fast", "sound"):
        net.certify(x, mode=mode)
        assert torch.equal(x, x0), mode


@pytest.mark.parametrize(
    "body",
    [
        lambda m, x: m.w(x) * m.v.weight.abs().max().item(),
        lambda m, x: F.leaky_relu(m.w(x), m.v.weight[0, 0].item()),
        lambda m, x: m.w(x) / m.v.weight[0].tolist()[0],
        lambda m, x: F.linear(m.w(x), m.v.weight),
    ],
)
def test_constants_read_from_the_models_tensors_are_refused(body):
    """Read once at build, such a constant went stale when training moved the tensor: K
    stayed at the old scale (x * p.item() with p 1 -> 10: K 10x too small)."""
    _refused(body, "comes from the model's parameters or buffers")


def test_shapes_of_the_models_tensors_are_constants():
    net = _net(lambda m, x: m.w(x) * m.v.weight.shape[0])
    assert _graph_bound(net, (6,)).sound() == pytest.approx(
        6 * sound.dense_norm_upper(net.w.weight), rel=1e-9
    )


def _scales_its_weight(m, x):
    m.w.weight.mul_(3.0)  # under certify's no_grad: each forward triples the weight
    return m.w(x)


def _scales_its_weight_data(m, x):
    m.w.weight.data.mul_(3.0)
    return m.w(x)


def _writes_its_weight_out(m, x):
    torch.mul(m.w.weight, 3.0, out=m.w.weight)
    return m.w(x)


@pytest.mark.parametrize(
    "body", [_scales_its_weight, _scales_its_weight_data, _writes_its_weight_out]
)
def test_a_forward_that_writes_the_models_tensors_is_refused(body):
    """K came from the weights before the forward, the logits from 3x them."""
    model = _net(body)
    w = model.w.weight.detach().clone()
    with pytest.raises(tg.UnsupportedLayerError, match="writes into the model's parameters"):
        tg.GloroNet(model, 0.1, in_shape=(6,))
    assert torch.equal(model.w.weight, w)  # refused before the graph ran


def test_forward_must_return_a_linear():
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return F.relu(self.fc(x))

    with pytest.raises(tg.UnsupportedLayerError, match="return the output of an nn.Linear"):
        tg.GloroNet(NoHead(), 0.1)


def test_cached_proofs_follow_the_weights_values():
    """A write through .data (no version bump) must not leave a stale proven bound."""
    net = _net(lambda m, x: m.w(x) + m.v(x))
    b = _graph_bound(net, (6,))
    before = b.sound()
    assert b.sound() == before and b.fp_terms() == b.fp_terms()
    net.w.weight.data.mul_(2.0)
    assert b.sound() > before * 1.2


class _LayerScale(nn.Module):
    """A learned per-channel scale and a fixed shift: ``h + γ ⊙ conv(h) + pos``."""

    def __init__(self, gamma_shape=(3, 1, 1)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.gamma = nn.Parameter(torch.rand(gamma_shape) + 0.5)
        self.register_buffer("pos", torch.randn(3, 4, 4))
        self.fc = nn.Linear(48, 2)

    def forward(self, x):
        h = x + self.gamma * self.conv(x) + self.pos
        return self.fc(h.flatten(1))


def test_model_tensors_scale_and_shift():
    torch.manual_seed(7)
    model = _LayerScale()
    b = _graph_bound(model, (3, 4, 4))
    conv = sound.conv2d_norm_upper(model.conv.weight, (4, 4), padding=(1, 1))
    expected = 1 + float(model.gamma.detach().abs().max()) * conv
    assert b.sound() == pytest.approx(expected, rel=1e-9)
    with torch.no_grad():
        exact = _exact_norm(lambda z: z + model.double().gamma * model.conv(z), (3, 4, 4))
    model.float()
    assert b.sound() >= exact * (1 - 1e-12)
    est = b.estimate(differentiable=True)
    est.backward()
    assert model.gamma.grad.abs().sum() > 0  # the training bound reaches the scale
    with torch.no_grad():
        model.gamma.mul_(3)
    assert b.sound() == pytest.approx(1 + 3 * (expected - 1), rel=1e-6)  # read afresh


def test_model_tensors_must_not_enlarge_a_sample():
    class Outer(nn.Module):  # (B, 1, 4) * (3, 1): each entry copied 3 times, norm √3·max|t|
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.Parameter(torch.ones(3, 1))
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc((x * self.t).flatten(1))

    with pytest.raises(tg.UnsupportedLayerError, match="enlarges the data"):
        tg.GloroNet(Outer(), 0.1, in_shape=(1, 4))
    with pytest.raises(tg.GloroInputError, match="cannot run"):  # (2, 3, 1, 1): not per sample
        tg.GloroNet(_LayerScale(gamma_shape=(2, 3, 1, 1)), 0.1, in_shape=(3, 4, 4))


def test_division_by_a_model_tensor():
    class Div(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.tensor([2.0, 4.0, 0.5]))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x / self.s)

    assert _graph_bound(Div(), (3,)).sound() == pytest.approx(2.0)

    class Inverse(Div):
        def forward(self, x):
            return self.fc(self.s / x)

    with pytest.raises(tg.UnsupportedLayerError, match="dividing by a data-dependent value"):
        tg.GloroNet(Inverse(), 0.1, in_shape=3)


def test_model_tensors_follow_the_net_through_to_and_copies():
    """``.to()`` replaces buffers: the bound must read the net's current one."""
    import copy

    torch.manual_seed(8)
    net = tg.GloroNet(_LayerScale(), 0.1, in_shape=(3, 4, 4)).double()
    for other in (net, copy.deepcopy(net)):
        with torch.no_grad():
            other.backbone.pos.mul_(10)  # in place, after the buffer was replaced by .double()
        terms = other.bounds[0].nodes[2].fp_terms()
        assert terms[2] == pytest.approx(float(other.backbone.pos.norm()), rel=1e-9)


def _float32_error_and_allowance(f, bound, z: torch.Tensor):
    """Per-entry |f₃₂(z) − f(z)| (float64's values as reference) and the round-off model's
    float32 allowance γ_n(A|z| + b/√d) per entry (the terms are ℓ2 over d entries)."""
    from torchgloro.margins import UNIT_ROUNDOFF_F32, UNIT_ROUNDOFF_F64, gamma

    n, A, b = bound.fp_terms()
    with torch.no_grad():
        err = (f(z).double() - f(z.double())).abs()
    g = gamma(n, UNIT_ROUNDOFF_F32) - gamma(n, UNIT_ROUNDOFF_F64)
    return err, g * (A * z.double().abs() + b / math.sqrt(z.shape[1]))


_Z = torch.rand(1_000_000, 1, generator=torch.Generator().manual_seed(0)) * 4 + 1


@pytest.mark.parametrize(
    "f",
    [
        lambda h: h * 0.1,
        lambda h: h * (1 + 1.01 * 2**-24),
        lambda h: h / (1 + 1.01 * 2**-24),
        lambda h: h / 0.3,
        lambda h: h + (1 + 1.01 * 2**-24),
        lambda h: 0.7 - h,
    ],
    ids=["mul", "mul-near-1", "div-near-1", "div", "add", "rsub"],
)
def test_python_constants_count_their_rounding_to_float32(f):
    """PyTorch rounds a Python constant to float32 before a float32 op (CUDA also divides as
    a product by fl(1/c)): h·0.1 was off by up to 1.2u relative, (1 + 1.01·2^-24)·h by 1.66u,
    above the one rounding (γ₁ ≈ u) the model counted."""
    bound = _graph_bound(_net(lambda m, x: f(m.w(x))), (6,)).nodes[1]
    assert bound.fp_terms_precision_free
    err, allowed = _float32_error_and_allowance(f, bound, _Z)
    assert float(err.max()) > 0 and bool((err <= allowed).all())


@pytest.mark.parametrize(
    "f", [lambda h: h * 1e-40, lambda h: h / 1e-40, lambda h: h + 1e-40, lambda h: h * 1e39]
)
def test_constants_outside_float32s_normal_range_certify_on_float64(f):
    """1e-40 is a float32 subnormal (rounded with a relative error up to 1.4e-5), 1e39
    overflows to inf: no relative float32 model, so float64 alone."""
    bound = _graph_bound(_net(lambda m, x: f(m.w(x))), (6,)).nodes[1]
    assert not bound.fp_terms_precision_free


@pytest.mark.parametrize("slope", [0.01, 0.3])
def test_leaky_relu_counts_its_slope_rounded_to_float32(slope):
    """fl(z·fl₃₂(a)): two roundings (observed 1.6u for a = 0.3)."""
    layer = nn.LeakyReLU(slope)
    bound = make_bound(layer, (1,))
    err, allowed = _float32_error_and_allowance(layer, bound, -_Z)
    assert float(err.max()) > 0 and bool((err <= allowed).all())
    assert not make_bound(nn.LeakyReLU(1e-40), (1,)).fp_terms_precision_free


def test_hardtanh_counts_its_limits_rounded_to_float32():
    """clamp(z, fl₃₂(−0.1), fl₃₂(0.1)) is 1.5e-9 off the exact clamp wherever it clips,
    which the exact model (no terms) missed; limits exact in float32 stay exact."""
    layer = nn.Hardtanh(-0.1, 0.1)
    bound = make_bound(layer, (1,))
    z = torch.cat([_Z, -_Z])
    err, allowed = _float32_error_and_allowance(layer, bound, z)
    assert float(err.max()) > 1e-9 and bool((err <= allowed).all())
    assert make_bound(nn.Hardtanh(-0.5, 2.0), (1,)).fp_terms() is None
    assert make_bound(nn.ReLU6(), (1,)).fp_terms() is None
    assert not make_bound(nn.Hardtanh(-1e-40, 1.0), (1,)).fp_terms_precision_free
