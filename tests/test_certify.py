"""Sound certification on float32 logits first (precision="auto"), float64 where needed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torchgloro as tg
from torchgloro._certify import (
    _float32_pass,
    _head_error,
    _layerwise_error,
    _may_certify,
    _norm_upper,
    _pair_slack,
    strict_fp32,
)
from torchgloro._errors import GloroInputError
from torchgloro._net_attributes import eval_mode
from torchgloro.bounds.registry import flatten_layers
from torchgloro.bounds.weight_cache import HeadRoundoff
from torchgloro.local import certify_local
from torchgloro.nn.layers import Residual
from torchgloro.nn.models import create_model


def _allowances(net, x, j=None):
    """Float32 logits and the (B, C) margin allowances for class j (default: the argmax):
    a priori (step 1) and per point (step 2)."""
    st = net._sound_state()
    with torch.no_grad(), strict_fp32():
        y, feats, acts = _float32_pass(flatten_layers(net.backbone), st.layerwise32[0], x)
    j = y.argmax(dim=1) if j is None else torch.full((len(x),), j, dtype=torch.long)
    x_norm = _norm_upper(x)
    r = _head_error(st.head32, _norm_upper(feats))
    prior = _pair_slack(st.head32, j, st.pen32[0] * x_norm + st.pen32[1], r)
    rows = torch.arange(x.shape[0])
    post = _pair_slack(st.head32, j, _layerwise_error(acts, st.layerwise32[1], rows, x_norm), r)
    return y, prior, post


def _net(arch="2c2f", in_shape=(1, 28, 28), seed=0, eps=0.05):
    torch.manual_seed(seed)
    return tg.GloroNet(create_model(arch, in_shape, 10), eps).eval()


def test_strict_fp32_forces_ieee_and_restores():
    owner = torch.backends.cuda.matmul
    before = owner.fp32_precision
    try:
        owner.fp32_precision = "tf32"  # what a user chasing speed may have set
        with strict_fp32():
            assert owner.fp32_precision == "ieee"
            assert torch.backends.mkldnn.conv.fp32_precision == "ieee"
            assert not torch.backends.cudnn.enabled
            assert not torch._C._get_nnpack_enabled()
        assert owner.fp32_precision == "tf32"
        assert torch.backends.cudnn.enabled
    finally:
        owner.fp32_precision = before


@pytest.mark.parametrize("mode", ["sound", "fast"])
def test_certify_runs_in_eval_mode_and_restores_every_flag(mode, monkeypatch):
    """Dropout-free nets give the same answer either way, so the flags are checked directly:
    certify evaluates in eval mode and hands back each submodule's own mode, mixed or not."""
    net = _net(eps=0.01)
    seen = []
    conv = nn.Conv2d._conv_forward  # a spy on the class: a GloroNet refuses hooks and
    layer = net.backbone[0]  # instance forward overrides

    def spy(self, *args):
        if self is layer:
            seen.append(self.training)
        return conv(self, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", spy)
    net.train()
    net.backbone[1].eval()  # a user's mixed state
    before = [m.training for m in net.modules()]
    net.certify(torch.rand(3, 1, 28, 28), mode=mode)
    assert seen and not any(seen)
    assert [m.training for m in net.modules()] == before
    with eval_mode(net):
        pass
    assert [m.training for m in net.modules()] == before


@pytest.mark.parametrize("arch,in_shape", [("2c2f", (1, 28, 28)), ("6c2f", (3, 32, 32))])
def test_float32_allowance_covers_float32_error_and_peak(arch, in_shape):
    """‖y32 − y‖ ≤ p‖x‖ + q on registered nets with large activations (errors visible)."""
    net = _net(arch, in_shape, seed=3)
    with torch.no_grad():  # scale weights up: large logits, visible float32 round-off
        for p in net.backbone.parameters():
            p.mul_(3.0)
    st = net._sound_state()
    assert st.err32 is not None and st.peak32 is not None
    x = torch.rand(64, *in_shape) * 5
    with torch.no_grad(), strict_fp32():
        y32 = net.backbone(x).double()
    y64 = st.backbone64(x.double())  # within ~1e-10 of the exact logits (test_sound.py)
    err = (y32 - y64).norm(dim=1)
    x_norm = x.flatten(1).double().norm(dim=1)
    bound = st.err32[0] * x_norm + st.err32[1]
    assert float(err.max()) > 0
    assert bool((err <= bound).all())
    assert bool((y64.abs().amax(dim=1) <= st.peak32[0] * x_norm + st.peak32[1]).all())
    # Each margin's allowance, a priori and from the measured activation norms: valid for
    # every class pair, tighter per point, and tighter than 2‖e‖ from the logits' bound.
    for j in range(y32.shape[1]):
        y_pass, prior, post = _allowances(net, x, j)
        assert torch.equal(y_pass, y32)  # layer by layer is the backbone's own forward
        off = (y32[:, j : j + 1] - y32) - (y64[:, j : j + 1] - y64)  # (B, C) margin errors
        assert float(off.abs().max()) > 0
        assert bool((off.abs() <= post).all()) and bool((off.abs() <= prior).all())
        assert bool((post <= prior).all())
        assert float((post / prior).median()) < 0.5
        assert float((prior / (2 * bound[:, None])).median()) < 1.0


def test_auto_certifies_exactly_the_float64_points(trained_digits_net):
    net, _, test = trained_digits_net
    for eps in (0.1, 0.3, 0.6):
        auto = net.certify(test.x, eps)
        f64 = net.certify(test.x, eps, precision="float64")
        assert f64.precision == "float64" and auto.precision == "float32"
        assert 0 < int(f64.certified.sum()) < len(test.x)  # a non-trivial split
        assert torch.equal(auto.certified, f64.certified)
        cert = auto.certified
        assert torch.equal(auto.pred[cert], f64.pred[cert])
        # float32 radii are proven too, hence never above the float64 ones (same K, more slack)
        assert bool((auto.radius <= f64.radius + 1e-12).all())


def test_open_points_go_to_float64(trained_digits_net):
    """With a huge float32 allowance float32 decides nothing: every row is float64's."""
    net, _, test = trained_digits_net
    st = net._sound_state()
    saved = st.pen32, st.layerwise32
    try:  # both float32 allowances (a priori, then per point)
        st.pen32, st.layerwise32 = (1e3, 1e3), (saved[1][0], 1e3)
        auto = net.certify(test.x[:200])
    finally:
        st.pen32, st.layerwise32 = saved
    f64 = net.certify(test.x[:200], precision="float64")
    assert torch.allclose(auto.logits, f64.logits, rtol=1e-12, atol=0)
    assert torch.allclose(auto.radius, f64.radius, rtol=1e-12, atol=0)
    assert torch.equal(auto.certified, f64.certified)


def test_float32_decisions_subtract_the_float32_allowance(trained_digits_net):
    """Rows decided on float32 logits are certified only if y_j − y_i − slack32 > ε·K_ji."""
    net, _, test = trained_digits_net
    eps = 0.3
    auto = net.certify(test.x, eps)
    f64 = net.certify(test.x, eps, precision="float64")
    # Rows float64 did not recompute: float32 values differ from float64 ones by ~1e-7, a
    # recomputed row (a sub-batch, other BLAS blocking) by ~1e-16.
    gap = (auto.logits - f64.logits).abs() / (1 + f64.logits.abs())
    from32 = (gap > 1e-11).any(dim=1)
    assert int(from32.sum()) > len(test.x) // 2  # most rows are decided on float32
    K = net.lipschitz_constant("sound")  # (C, C) proven, float64
    y32, prior, post = _allowances(net, test.x)
    y, j = auto.logits, auto.pred
    assert torch.equal(y[from32], y32[from32]) and torch.equal(j, y32.argmax(dim=1))
    ok = torch.zeros(len(y), dtype=torch.bool)
    for slack in (post, prior):  # certified by the per-point or by the a-priori allowance
        margin = y.gather(1, j[:, None]) - y - slack - eps * K[j]  # (B, C)
        margin.scatter_(1, j[:, None], float("inf"))
        ok |= (margin > 0).all(dim=1)
    assert bool((ok | ~(auto.certified & from32)).all())
    assert int((ok & from32).sum()) > 0


def test_may_certify_catches_a_different_float64_class():
    # float32 argmax is class 0 by a hair; float64 could prefer class 1 by up to 2·slack.
    y = torch.tensor([[1.0, 0.999, -5.0]], dtype=torch.float64)
    K = torch.full((3, 3), 1.0, dtype=torch.float64).fill_diagonal_(0)
    pred = y.argmax(1)
    slack = torch.tensor([0.01], dtype=torch.float64)
    assert bool(_may_certify(y, pred, K, slack, epsilon=0.004, lipschitz="margin")[0])
    assert not bool(_may_certify(y, pred, K, slack, epsilon=0.5, lipschitz="margin")[0])
    # Per-pair slack: class 1 can win in float64 only by up to slack[1] - 0.001 (class 2 is
    # 6 below), so a large slack on the pair (0, 2) keeps nothing open.
    wide, narrow = [[0.0, 0.01, 1e-6]], [[0.0, 1e-6, 0.01]]
    for pair, expect in ((wide, True), (narrow, False)):
        pair = torch.tensor(pair, dtype=torch.float64)
        assert bool(_may_certify(y, pred, K, pair, epsilon=0.004, lipschitz="margin")[0]) is expect
    # Class 0 cannot be certified (class 2 is 1e-5 below it, with no slack); class 1 can only
    # if its pair's slack covers the 0.001 it trails by plus ε·K = 0.004.
    y2 = torch.tensor([[1.0, 0.999, 0.99999]], dtype=torch.float64)
    for s1, expect in ((0.006, True), (0.0049, False)):
        pair = torch.tensor([[0.0, s1, 0.0]], dtype=torch.float64)
        got = bool(_may_certify(y2, pred, K, pair, epsilon=0.004, lipschitz="margin")[0])
        assert got is expect


def test_float64_input_and_residual_nets_use_float64(trained_digits_net):
    net, _, test = trained_digits_net
    c = net.certify(test.x[:50].double())
    assert c.precision == "float64"
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), Residual(nn.Sequential(nn.Linear(32, 32), nn.ReLU())),
        nn.Linear(32, 10),
    )  # fmt: skip
    rnet = tg.GloroNet(backbone, 0.1, in_shape=(1, 8, 8)).eval()
    assert rnet._sound_state().err32 is None  # its fp_terms hold float64's unit round-off
    assert rnet.certify(test.x[:50]).precision == "float64"
    dw = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                       nn.Linear(64, 10))  # fmt: skip
    dwnet = tg.GloroNet(dw, 0.1, in_shape=(1, 8, 8)).eval()
    assert dwnet._sound_state().err32 is None  # depthwise 3x3: Winograd on ARM CPUs


def test_local_fallback_same_from_either_precision(trained_digits_net):
    net, _, test = trained_digits_net
    x = test.x[:120]
    a = certify_local(net, x, 0.3, net.certify(x, 0.3))
    b = certify_local(net, x, 0.3, net.certify(x, 0.3, precision="float64"))
    assert torch.equal(a, b)
    assert torch.equal(net.certify(x, 0.3, fallback="local").certified, b)


def test_bad_precision_is_a_clear_error(trained_digits_net):
    net, _, test = trained_digits_net
    with pytest.raises(GloroInputError, match="precision must be 'auto' or 'float64'"):
        net.certify(test.x[:2], precision="float16")


def test_pair_slack_known_answer():
    """slack_ji = ‖w_j − w_i‖·err + 2r, rounded up by a relative 1e-9, for the argmax j."""
    hd = HeadRoundoff(
        gamma=1e-7, underflow=1e-30, row_norm=5.0, bias=2.0,
        pair=torch.tensor([[0.0, 2.0, 3.0], [2.0, 0.0, 4.0], [3.0, 4.0, 0.0]], dtype=torch.float64),
    )  # fmt: skip
    j = torch.tensor([0, 2])
    err = torch.tensor([0.5, 0.25], dtype=torch.float64)
    r = torch.tensor([0.1, 0.0], dtype=torch.float64)
    s = _pair_slack(hd, j, err, r)
    want = torch.tensor([[0.2, 1.2, 1.7], [0.75, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(s, want * (1 + 1e-9), rtol=1e-15, atol=0)
    # The head's own round-off: γ(max‖w_k‖·‖h̃‖ + max|b|) + underflow, never below it.
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    rr = _head_error(hd, _norm_upper(feats))
    assert float(rr[0]) >= 1e-7 * (5.0 * 5.0 + 2.0) and float(rr[0]) <= 1e-7 * 27 * (1 + 1e-6)
    assert float(rr[1]) >= 1e-7 * 2.0


def _certificates_equal(a, b):
    for name in ("pred", "certified", "radius", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.precision == b.precision


def test_caller_autocast_does_not_change_certificates():
    """Under a caller's bfloat16 autocast the backbone's convolutions and products would run
    in bfloat16, outside the float32 round-off model: certification must ignore it. The
    proven state is built inside the autocast block here, so its bounds are checked too."""
    x = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plain, cast = _net(eps=0.01), _net(eps=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.backbone(x).dtype == torch.bfloat16  # autocast is really on
        got = {
            "auto": cast.certify(x),
            "float64": cast.certify(x, precision="float64"),
            "fast": cast.certify(x, mode="fast"),
        }
        k_sound, k_fast = cast.lipschitz_constant("sound"), cast.lipschitz_constant("fast")
    _certificates_equal(got["auto"], plain.certify(x))
    _certificates_equal(got["float64"], plain.certify(x, precision="float64"))
    _certificates_equal(got["fast"], plain.certify(x, mode="fast"))
    assert got["auto"].certified.any() and not got["auto"].certified.all()
    assert torch.equal(k_sound, plain.lipschitz_constant("sound"))
    assert torch.equal(k_fast, plain.lipschitz_constant("fast"))


def test_training_bound_stays_float32_under_autocast():
    """The power iteration and the differentiable K run in float32 inside a caller's
    autocast, as with the trainer's own AMP (which casts only the backbone)."""
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    plain, cast = _net().train(), _net().train()
    out = plain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_cast = cast(x)
    assert cast.last_class_bounds.dtype == torch.float32
    assert torch.equal(cast.last_class_bounds, plain.last_class_bounds)
    for a, b in zip(plain.buffers(), cast.buffers()):  # the persistent iterates (and NaNs)
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    assert out_cast.shape == out.shape


def _overflowing_net():
    """A net whose float64 pass may overflow inside a dot product on x = 3e38: summed left
    to right, a partial sum reaches −inf, the ReLU clips it to 0, and the float64 logits come
    out finite but wrong (exactly: [1.3e301, 9.8e306], argmax 1; float64: [1.3e301, 0],
    argmax 0). Summed pairwise (as some CPUs' kernels do), the same logits come out right."""
    chain = [nn.Linear(1, 1, bias=False) for _ in range(7)]
    bb = nn.Sequential(*chain, nn.Linear(1, 4, bias=False), nn.Linear(4, 2, bias=False),
                       nn.ReLU(), nn.Linear(2, 2, bias=False))  # fmt: skip
    with torch.no_grad():
        for layer in chain:
            layer.weight.fill_(3e38)
        bb[7].weight.copy_(torch.tensor([[-1.83], [-1.83], [1.83], [1.98]]))
        bb[8].weight.copy_(torch.tensor([[0, 0, 0, 1e-7], [1, 1, 1, 1]]))
        bb[10].weight.copy_(torch.eye(2))
    return tg.GloroNet(bb, epsilon=1.0, in_shape=(1,)).eval()


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_float64_overflow_is_never_certified(precision):
    net = _overflowing_net()
    x = torch.tensor([[3e38]])
    cert = net.certify(x, precision=precision)
    # Whatever order this CPU sums in, the point is never certified ...
    assert not bool(cert.certified[0]) and float(cert.radius[0]) == 0.0
    # ... and where this CPU's float64 pass does go wrong (its argmax is not the exact class
    # 1), the certificate reports that wrong class, which is exactly what it must not certify.
    float64_logits = copy.deepcopy(net.backbone).double()(x.double())
    if int(float64_logits.argmax()) == 0:
        assert int(cert.pred[0]) == 0 and bool(torch.isfinite(cert.logits).all())
    assert int(net.predict(x)[0]) == net.ABSTAIN
    assert not bool(net.certify(x, fallback="local").certified[0])


def _flush_denormal_net():
    """Linear(1e-39, a float32 subnormal) → Linear(1e12) → head [1, −1], bias (0, 1e-9):
    at x = 1e18 the exact margin f_0 − f_1 is +1e-9 (class 0). A CPU that reads subnormals
    as 0 (torch.set_flush_denormal(True)) drops the first product whole: class 1."""
    l1, l2, head = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        l1.weight.fill_(1e-39)
        l2.weight.fill_(1e12)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.copy_(torch.tensor([0.0, 1e-9]))
    return tg.GloroNet(nn.Sequential(l1, l2, head), epsilon=1.0, in_shape=(1,)).eval()


@pytest.mark.parametrize("precision", ["auto", "float64"])
def test_certificates_ignore_a_callers_flush_denormal(precision):
    net = _flush_denormal_net()
    x = torch.tensor([[1e18]])
    plain = net.certify(x, precision=precision)
    assert int(plain.pred[0]) == 0 and bool(plain.certified[0])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (no DAZ/FTZ): nothing to guard")
    try:
        assert float(torch.tensor(1e-39) * 1.0) == 0.0  # flushing really is on
        cert = net.certify(x, precision=precision)
        assert float(torch.tensor(1e-39) * 1.0) == 0.0  # and the caller's setting is back
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(cert.pred, plain.pred) and torch.equal(cert.radius, plain.radius)


def test_tiny_float64_inputs_keep_their_norm_allowance():
    """Squares of entries near 1e-170 underflow: the float64 norm came out 0 and the relative
    round-off allowance vanished; float64 cancellation then certified the wrong class."""
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]))
    net = tg.GloroNet(nn.Sequential(head), epsilon=1.0, in_shape=(3,)).eval()
    s = 1e-170
    x = torch.tensor([[s, s * 2.0**-54, -s]], dtype=torch.float64)
    assert float(torch.linalg.vector_norm(x)) == 0.0  # the premise: the squares underflow
    cert = net.certify(x, 1e-190)  # exact logits (5.55e-187, 2.78e-187): class 0; float64: 1
    assert not bool(cert.certified[0]) or int(cert.pred[0]) == 0
    assert not bool(certify_local(net, x, 1e-190, cert)[0]) or int(cert.pred[0]) == 0


def test_auto_decides_finite_inputs_whose_float32_norm_overflows_like_float64():
    l1, head = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        l1.weight.copy_(torch.eye(2) * 1e-25)
        l1.bias.zero_()
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    net = tg.GloroNet(nn.Sequential(l1, head), epsilon=1.0, in_shape=(2,)).eval()
    x = torch.tensor([[3e19, 1e19]])  # finite, but its float32 norm is inf
    auto, f64 = net.certify(x), net.certify(x, precision="float64")
    assert bool(f64.certified[0])
    assert torch.equal(auto.certified, f64.certified) and torch.equal(auto.pred, f64.pred)


def test_a_loaded_invalid_epsilon_is_refused():
    net = _net()
    state = net.state_dict()
    x = torch.rand(2, 1, 28, 28)
    for bad in (-1.0, 0.0, float("nan")):
        state["_epsilon"] = torch.tensor(bad)
        net.load_state_dict(state)  # a buffer: nothing checks it on the way in
        with pytest.raises(GloroInputError, match="epsilon"):
            net.certify(x)
        with pytest.raises(GloroInputError, match="epsilon"):
            net.predict(x)
    assert net.certify(x, epsilon=0.05).pred.shape == (2,)  # an explicit ε still works


def _residual_overflow_net():
    """x → (x, x) → Residual(1e20·x → ReLU → −0.5e-20·) → ReLU → head diag(4, 1). At
    x = 1e289 the block's inner value 1e20·x is inf in float64; its ReLU and the add give a
    finite but wrong feature (0 instead of x/2), and class 1 instead of the exact class 0."""

    def per_channel(values):
        c = nn.Conv2d(2, 2, 1, groups=2, bias=False)
        with torch.no_grad():
            c.weight.copy_(torch.tensor(values).view(2, 1, 1, 1))
        return c

    split, head = nn.Conv2d(1, 2, 1, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        split.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    inner = nn.Sequential(per_channel([1e20, 1.0]), nn.ReLU(), per_channel([-0.5e-20, 0.0]))
    bb = nn.Sequential(split, Residual(inner), nn.ReLU(), nn.Flatten(), head)
    return tg.GloroNet(bb, epsilon=1.0, in_shape=(1, 1, 1)).eval()


def test_overflow_inside_a_residual_block_is_never_certified():
    """Found by a review: the overflow guard saw the block's output, not its inner values."""
    net = _residual_overflow_net()
    x = torch.full((1, 1, 1, 1), 1e289, dtype=torch.float64)
    cert = net.certify(x, epsilon=1e280)
    assert int(cert.pred[0]) == 1  # the float64 pass did go wrong (exact class: 0)
    assert not bool(cert.certified[0]) and float(net.certified_radius(x)[0]) == 0.0
    a, b = net._sound_state().peak64
    assert a * 1e289 + b >= 1e20 * 1e289  # the guard now bounds the inner value


def test_avg_pool_window_sums_count_in_the_float32_overflow_guard():
    """Found by a review: AvgPool2d sums its window before dividing, so in float32 the sum
    of 400x400 entries of -2.14e33 overflows to -inf although the mean does not; the guard
    modelled only the mean and certified the float32 logits' class 1 (exact class: 0)."""
    s = 400
    scale, mix, head = (
        nn.Conv2d(2, 2, 1, groups=2, bias=False),
        nn.Linear(2, 1, bias=False),
        nn.Linear(1, 2),
    )
    with torch.no_grad():
        scale.weight.fill_(1e17)
        mix.weight.copy_(torch.tensor([[1e-5, 1.0]]))
        head.weight.copy_(torch.tensor([[1.0], [0.0]]))
        head.bias.copy_(torch.tensor([0.0, 5e32]))
    bb = nn.Sequential(scale, nn.AvgPool2d(s), nn.Flatten(), mix, nn.ReLU(), head)
    net = tg.GloroNet(bb, epsilon=1.0, in_shape=(2, s, s)).eval()
    x = torch.empty(1, 2, s, s)
    x[:, 0], x[:, 1] = -2.14e16, 1e16
    with torch.no_grad():
        assert float(bb[1](bb[0](x))[0, 0]) == float("-inf")  # the premise: float32 overflows
    cert = net.certify(x)
    assert not bool(cert.certified[0]) or int(cert.pred[0]) == 0
    assert int(net.predict(x)[0]) in (0, net.ABSTAIN)


def test_a_subnormal_lipschitz_product_is_rounded_up_not_to_zero():
    """Found by a review: K = ‖w_0 − w_1‖·k_pen in round-to-nearest came out exactly 0 for a
    subnormal k_pen, and a zero K certifies any radius."""
    layers = []
    for w in [1e-30] * 10 + [1e-24]:  # product 1e-324: below the smallest normal float64
        lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            lin.weight.fill_(w)
        layers.append(lin)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.2], [-0.2]]))
        head.bias.copy_(torch.tensor([1.4e-45, 0.0]))
    net = tg.GloroNet(nn.Sequential(*layers, head), epsilon=1.0, in_shape=(1,)).eval()
    K = net.lipschitz_constant()
    assert float(K[0, 1]) > 0.0  # the exact K_01 is 4e-325 > 0
    assert math.isfinite(float(net.certified_radius(torch.zeros(1, 1, dtype=torch.float64))[0]))


def test_certify_works_after_the_new_fp32_precision_api_was_used():
    """Found by a review: torch.backends.cudnn.flags read the legacy TF32 flag, which raises
    once fp32_precision was set, so every certify call failed."""
    mkldnn = torch.backends.mkldnn
    if not hasattr(mkldnn, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    net = tg.GloroNet(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 0.05, in_shape=(4,)
    )
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    plain = net.eval().certify(x)
    old = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        cert = net.certify(x)
        assert mkldnn.fp32_precision == "bf16"  # the caller's setting is back
    finally:
        mkldnn.fp32_precision = old
    assert torch.equal(cert.certified, plain.certified) and torch.equal(cert.radius, plain.radius)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"precision": "float64"}, {"mode": "fast"}, {"fallback": "local"}],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certify_never_overwrites_the_callers_input(kwargs, dtype):
    """Issue #30, item 4: with an in-place first layer (``nn.ReLU(inplace=True)``),
    ``certify`` turned the caller's [-1, 2, -3, 4] into [0, 2, 0, 4]."""
    torch.manual_seed(0)
    relu = nn.ReLU(inplace=True)
    f = nn.Sequential(relu, nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    net = tg.GloroNet(f, 0.1, in_shape=(4,)).eval()
    x = torch.tensor([[-1.0, 2.0, -3.0, 4.0]], dtype=dtype)
    net.certify(x, **kwargs)
    net.predict(x, **{k: v for k, v in kwargs.items() if k != "precision"})
    assert x.tolist() == [[-1.0, 2.0, -3.0, 4.0]]
