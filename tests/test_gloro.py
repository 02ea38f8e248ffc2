"""GloroNet: the ⊥ logit, certification, ties, errors, and Theorem 1 checked empirically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchgloro as tg


def tiny_net(w_head, bias=None, eps=0.1):
    """A 2-feature net: Flatten → Linear(head) with a given weight, for hand-made cases."""
    head = nn.Linear(w_head.shape[1], w_head.shape[0])
    with torch.no_grad():
        head.weight.copy_(w_head)
        head.bias.copy_(bias if bias is not None else torch.zeros(w_head.shape[0]))
    return tg.GloroNet(nn.Sequential(nn.Flatten(), head), eps, in_shape=(1, 1, w_head.shape[1]))


def test_forward_shape_and_bottom_logit_formula():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    net = tiny_net(w, eps=0.5).eval()
    x = torch.tensor([[[[2.0, 0.5]]]])
    out = net(x)  # y = (2, 0.5, -2); j = 0
    assert out.shape == (1, 4)
    # K_0i = ‖w_0 − w_i‖ (K_pen = 1): K_01 = √2, K_02 = 2
    expected = max(0.5 + 0.5 * 2**0.5, -2 + 0.5 * 2)
    assert float(out[0, 3].detach()) == pytest.approx(expected, rel=1e-5)
    assert int(net.predict(x, mode="fast")) == 0  # 2 > 1.207
    assert float(net.certified_radius(x)) == pytest.approx(1.5 / 2**0.5, rel=1e-6)


def test_tied_top_logits_are_never_certified():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 identical: K_01 = 0
    net = tiny_net(w, eps=0.1).eval()
    x = torch.tensor([[[[3.0, 0.0]]]])
    for mode in ("sound", "fast"):
        c = net.certify(x, mode=mode)
        assert not bool(c.certified[0]) and float(c.radius[0]) == 0.0
        assert int(net.predict(x, mode=mode)[0]) == net.ABSTAIN == 3


def test_margin_exactly_at_eps_times_k_is_not_certified():
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # K_01 = 1
    net = tiny_net(w, eps=0.5).eval()
    x = torch.tensor([[[[0.5, 0.0]]]])  # margin 0.5 = ε·K exactly
    assert not bool(net.certify(x, mode="sound").certified[0])
    assert not bool(net.certify(x, mode="fast").certified[0])
    assert bool(net.certify(x, epsilon=0.49, mode="sound").certified[0])


def test_near_zero_weights_never_certify_wrongly():
    """TF gloro #8: tiny weights must not make the bound (and the certificate) degenerate."""
    f = tg.create_model("minicnn", (1, 8, 8), 10)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(1e-20)
    net = tg.GloroNet(f, 0.3).eval()
    x = torch.rand(16, 1, 8, 8)
    c = net.certify(x)
    K = net.lipschitz_constant("sound")
    assert torch.isfinite(K).all() and bool((K[~torch.eye(10, dtype=bool)] > 0).all())
    margins = c.logits.max(1).values[:, None] - c.logits
    # Whatever is certified has a margin beyond ε·K for every other class.
    for b in torch.nonzero(c.certified).flatten():
        j = c.pred[b]
        others = torch.arange(10) != j
        assert bool((margins[b, others] > 0.3 * K[j, others]).all())


def test_epsilon_validation_and_setter():
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(tg.GloroInputError, match="epsilon"):
            net.epsilon = bad
        with pytest.raises(tg.GloroInputError):
            tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), bad)
    net.epsilon = 0.7
    assert net.epsilon == pytest.approx(0.7)
    with pytest.raises(tg.GloroInputError):
        net.certify(torch.rand(2, 1, 8, 8), epsilon=0)


def test_input_errors_are_clear():
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).eval()
    with pytest.raises(tg.GloroInputError, match=r"\(B, 1, 8, 8\)"):
        net(torch.rand(2, 1, 9, 9))
    with pytest.raises(tg.GloroInputError, match="unsqueeze"):
        net.predict(torch.rand(1, 8, 8))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.rand(2, 1, 8, 8)
        x[1, 0, 3, 3] = bad
        for kw in ({}, {"precision": "float64"}, {"mode": "fast"}):
            with pytest.raises(tg.GloroInputError, match="NaN or Inf"):
                net.certify(x, **kw)
        with pytest.raises(tg.GloroInputError, match="NaN or Inf"):
            net.certify(x.half())  # float16: converts to float32 exactly
        with pytest.raises(tg.GloroInputError, match="NaN"):
            net(x)
    # Huge but finite: float32 norms overflow (the elementwise test then passes) and sound
    # mode decides it on float64, whose norm is finite.
    huge = torch.full((1, 1, 8, 8), 3e38)
    auto, f64 = net.certify(huge), net.certify(huge, precision="float64")
    assert bool(f64.logits.isfinite().all()) and torch.equal(auto.logits, f64.logits)
    with pytest.raises(tg.GloroInputError, match="floating"):
        net(torch.ones(2, 1, 8, 8, dtype=torch.long))


def test_refresh_tracks_weight_changes():
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).eval()
    k1 = float(net.refresh())
    assert not net.is_stale
    with torch.no_grad():
        net.backbone[0].weight.mul_(2)
    assert net.is_stale
    net(torch.rand(1, 1, 8, 8))  # auto-refresh in eval mode
    assert not net.is_stale and float(net._frozen_k_pen) == pytest.approx(2 * k1, rel=1e-3)


def test_sound_bound_dominates_fast_and_is_tight(trained_digits_net):
    net, _, _ = trained_digits_net
    off = ~torch.eye(10, dtype=bool)
    ks, kf = net.lipschitz_constant("sound")[off], net.lipschitz_constant("fast")[off].double()
    assert bool((ks >= kf * (1 - 1e-6)).all())
    assert float((ks / kf).max()) < 1.05


def test_trained_net_certifies_and_sound_vra_close_to_fast(trained_digits_net):
    net, _, test = trained_digits_net
    sound, fast = net.certify(test.x), net.certify(test.x, mode="fast")
    vra_s = float((sound.certified & (sound.pred == test.y)).float().mean())
    vra_f = float((fast.certified & (fast.pred == test.y)).float().mean())
    assert vra_s > 0.3  # far above chance (0.1)
    assert vra_s <= vra_f + 1e-9 and vra_f - vra_s < 0.02
    assert bool((sound.certified <= fast.certified).all())


def _pgd_l2(f, x, target, eps, steps=60):
    """Untargeted ℓ2 PGD that pushes away from ``target``; returns the worst points found."""
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * 0.5
    for _ in range(steps):
        delta.requires_grad_(True)
        y = f(x + delta)
        top_other = y.masked_fill(nn.functional.one_hot(target, y.shape[1]).bool(), -1e9).amax(1)
        margin = y.gather(1, target[:, None]).squeeze(1) - top_other
        (g,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta - 2.5 * eps / steps * 4 * g
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * (eps / norm).clamp(max=1.0)
    return (x + delta).detach()


def test_theorem1_certified_points_survive_attacks(trained_digits_net):
    """Every certified point keeps its prediction under PGD and on random sphere points."""
    net, _, test = trained_digits_net
    eps = net.epsilon
    c = net.certify(test.x)
    xs, preds = test.x[c.certified], c.pred[c.certified]
    assert len(xs) > 50
    adv = _pgd_l2(net.backbone, xs, preds, eps)
    assert bool(((adv - xs).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all())
    with torch.no_grad():
        assert bool((net.backbone(adv).argmax(1) == preds).all())
        for _ in range(20):
            d = torch.randn_like(xs)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
            assert bool((net.backbone(xs + d).argmax(1) == preds).all())


def test_basic_variant_is_looser_but_sound(trained_digits_net):
    net, _, test = trained_digits_net
    basic = tg.GloroNet(net.backbone, net.epsilon, lipschitz="basic").eval()
    cm, cb = net.certify(test.x), basic.certify(test.x)
    assert bool((cb.certified <= cm.certified).all())
    assert bool((cb.radius <= cm.radius + 1e-9).all())


def test_local_fallback_through_certify(trained_digits_net):
    net, _, test = trained_digits_net
    x = test.x[:100]
    plain = net.certify(x)
    local = net.certify(x, fallback="local")
    assert bool((plain.certified <= local.certified).all())
    again = net.certify(x, fallback="local")
    assert torch.equal(local.certified, again.certified)
    with pytest.raises(tg.GloroInputError, match="sound"):
        net.certify(x, mode="fast", fallback="local")
    with pytest.raises(tg.GloroInputError, match="fallback"):
        net.certify(x, fallback="global")


def test_torch_compile_matches_eager():
    """A compiled GloroNet trains and evaluates like the eager one (aot_eager: no C++ build)."""
    torch.manual_seed(0)
    eager = tg.GloroNet(tg.create_model("2c2f", (1, 28, 28), 10), 0.3)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss_fn = tg.GloroCrossEntropy()
    for net, fwd in ((eager, eager), (compiled_net, compiled)):
        net.train()
        torch.manual_seed(1)
        loss_fn(fwd(x), y).backward()
    for p, q in zip(eager.parameters(), compiled_net.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    eager.eval(), compiled_net.eval()
    assert torch.allclose(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_training_step_iterates_every_layer_as_estimate_would():
    """A training forward runs ``power_iterations`` iterations per layer (eagerly on a CPU),
    the same as each bound's own ``estimate(n_iter)``; copies start without a CUDA graph."""
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("4c3f", (1, 28, 28), 10, "minmax", lln=True), 1.0)
    net.power_iterations = 3
    ref, init = copy.deepcopy(net), copy.deepcopy(net)
    assert ref._graphed is not net._graphed and ref._graphed._graphs == {}
    net.train()
    net(torch.rand(4, 1, 28, 28))
    for b in ref.bounds:
        b.estimate(n_iter=3)
    moved = 0
    for (name, a), b, c in zip(
        net.bounds.named_buffers(), ref.bounds.buffers(), init.bounds.buffers()
    ):
        assert torch.equal(a, b), name
        moved += int(not torch.equal(a, c))
    assert moved >= 6  # 4 convs + 2 hidden dense layers iterate
    assert net._graphed._graphs == {} and net._graphed._ptrs is None  # no graph on a CPU


@pytest.mark.parametrize("change", ["fused_adam", "data_write"])
def test_caches_follow_weight_changes_that_do_not_bump_version(change):
    """Fused optimizers and ``.data`` writes change weights without ``Tensor._version``:
    the proven bounds, the frozen fast K and certificates must still follow the new weights."""
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).eval()
    x = torch.rand(16, 1, 8, 8)
    k_sound, k_fast = net.lipschitz_constant("sound"), net.lipschitz_constant("fast")
    net.certify(x)  # fills every cache
    versions = [p._version for p in net.parameters()]
    if change == "fused_adam":
        opt = torch.optim.Adam(net.parameters(), lr=0.5, fused=True)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    else:
        for p in net.parameters():
            p.data.mul_(3.0)
    assert [p._version for p in net.parameters()] == versions  # the premise of this test
    fresh = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).eval()
    fresh.load_state_dict(net.state_dict())
    assert not torch.allclose(net.lipschitz_constant("sound"), k_sound)
    assert torch.equal(net.lipschitz_constant("sound"), fresh.lipschitz_constant("sound"))
    assert not torch.allclose(net.lipschitz_constant("fast"), k_fast, rtol=1e-3)
    c, c_fresh = net.certify(x), fresh.certify(x)
    assert torch.equal(c.radius, c_fresh.radius) and torch.equal(c.certified, c_fresh.certified)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_deepcopy_after_a_training_step_with_the_amp_train_module():
    """A net holding the last training graph's K still copies, so the sound state (a float64
    copy of the backbone) can be built after training; the trainer's AMP wrapper leaves no
    hooks on the backbone (a GloroNet refuses hooked layers) and gives the net's logits."""
    from torchgloro.train.build import TrainModule

    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3)
    module = TrainModule(net, amp=True)  # CUDA autocast: a no-op on this CPU
    net.train()
    x = torch.rand(4, 1, 8, 8)
    out = module(x, robust=True)
    assert out.shape == (4, 11) and out.dtype == torch.float32
    assert torch.equal(module(x, robust=False), net.backbone(x))
    assert torch.equal(out[:, :10], net(x)[:, :10])  # (⊥ moves: each step iterates K)
    tg.GloroCrossEntropy()(out, torch.tensor([0, 1, 2, 3]))
    assert net.last_class_bounds is not None and net.last_class_bounds.grad_fn is not None
    copied = copy.deepcopy(net)
    assert copied.last_class_bounds is None
    net.eval()
    assert net.certify(torch.rand(4, 1, 8, 8)).pred.shape == (4,)
    K = net.lipschitz_constant("sound")
    assert torch.equal(K, copied.eval().lipschitz_constant("sound"))


def test_joint_refresh_of_the_graphed_path_matches_per_layer_convergence(monkeypatch):
    """On a GPU, refresh iterates all layers together (10 per graph replay); the frozen K
    must agree with the per-layer convergence used elsewhere. Run here with the graph
    replaced by the eager iterations it records."""
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("4c3f", (1, 28, 28), 10), 1.58).eval()
    joint = copy.deepcopy(net)
    calls = []
    monkeypatch.setattr(joint, "_graph_operands", lambda: ([], []))
    monkeypatch.setattr(joint, "_graphed", lambda run, n, state, inputs: calls.append(n) or run(n))
    k_joint, k_layer = float(joint.refresh()), float(net.refresh())
    assert calls and set(calls) == {10}  # went through the graphed path, 10 at a time
    # Iterating longer never lowers a power-iteration estimate (the joint loop runs every
    # layer until the slowest converges), and no estimate passes the proven bound.
    assert k_layer * (1 - 1e-6) <= k_joint <= net._sound_state().k_pen
    assert k_joint == pytest.approx(k_layer, rel=1e-3)
    assert float(joint.refresh()) == pytest.approx(k_joint, rel=1e-4)  # unchanged weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_fast_mode_takes_other_float_inputs(dtype):
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).eval()
    x = torch.rand(4, 1, 8, 8)
    ref = net.certify(x.to(dtype).float(), mode="fast")
    cert = net.certify(x.to(dtype), mode="fast")  # was a dtype-mismatch RuntimeError
    assert torch.equal(cert.pred, ref.pred) and torch.equal(cert.radius, ref.radius)


@pytest.mark.parametrize("eps", [1e-300, 1e300])
def test_epsilon_outside_float32_range_is_a_clear_error(eps):
    """The net keeps ε in a float32 buffer: 1e-300 used to become 0 silently."""
    f = tg.create_model("minicnn", (1, 8, 8), 10)
    with pytest.raises(tg.GloroInputError, match="float32's range"):
        tg.GloroNet(f, eps)
    net = tg.GloroNet(f, 0.3)
    with pytest.raises(tg.GloroInputError, match="float32's range"):
        net.epsilon = eps
    assert net.epsilon == pytest.approx(0.3)  # unchanged by the refused assignment


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_dtype_casts_keep_epsilon_as_given(cast, tmp_path):
    """Found by a review: .half() cast the ε buffer too (0.1 became 0.09998, a smaller radius
    than asked for, then saved as the model's ε)."""
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.1)
    getattr(net, cast)()
    assert net._epsilon.dtype == torch.float32 and net.epsilon == float(torch.tensor(0.1))
    assert net.backbone[0].weight.dtype != torch.float32  # the weights did follow the cast
    net.epsilon = 0.3
    assert net.epsilon == float(torch.tensor(0.3))


@pytest.mark.parametrize("eps", [0.7, 0.9, 0.3])
def test_the_stored_epsilon_is_never_below_the_one_given(eps):
    """Issue #30, item 5: ε = 0.7 was stored as float32 rounded to nearest, 0.699999988, so
    certify and predict covered a smaller ball than asked for."""
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), eps)
    assert net.epsilon >= eps and net.epsilon == pytest.approx(eps, rel=1e-7)
    net.epsilon = eps  # the setter too (schedules set it per batch)
    assert net.epsilon >= eps
    assert net.certify(torch.rand(2, 1, 8, 8)).epsilon >= eps


@pytest.mark.parametrize("training", [True, False])
def test_nan_input_to_forward_is_a_clear_error_in_both_modes(training):
    """Issue #30, item 9: ``net.train(); net(x_with_nan)`` returned NaN, where eval mode
    raised a clear error."""
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).train(training)
    x = torch.rand(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(tg.GloroInputError, match="NaN or Inf"):
        net(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_forward_takes_any_float_dtype_as_certify_does(dtype, training):
    """Issue #30, item 9: ``net(x.half())``, ``.bfloat16()`` and ``.double()`` raised raw
    dtype errors in forward, while ``certify`` handled all three."""
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.3).train(training)
    x = torch.rand(3, 1, 8, 8).to(dtype)
    out = net(x)
    assert out.shape == (3, 11) and out.dtype == torch.float32
    net.eval()
    assert torch.equal(net(x), net(x.float()))
