"""Metrics, certified-accuracy curve and Lipschitz bounds on a small trained GloRo net."""

from __future__ import annotations

import re

import pytest
import torch

from torchgloro._errors import UnsoundBoundError
from torchgloro.evaluate import EvalOptions, evaluate_net, lower_bounds, metrics

SMALL = dict(
    pgd_steps=10,
    lb_steps=40,
    lb_points=16,
    lb_lr=1e-2,
    local_steps=30,
    local_lr=1e-2,
)


def test_curve_counts_strictly_greater_radii():
    radius = torch.tensor([0.0, 0.1, 0.3, 0.3, 0.5, 2.0], dtype=torch.float64)
    correct = torch.tensor([True, True, True, False, True, True])
    grid = metrics.curve_grid(radius, 0.3, n=11)
    acc = metrics.certified_accuracy_curve(radius, correct, grid)
    at = dict(zip(grid.tolist(), acc.tolist()))
    assert at[0.0] == pytest.approx(4 / 6)  # radius 0 is never certified
    assert at[0.3] == pytest.approx(2 / 6)  # radius == ε is not certified (strict)
    assert at[0.5] == pytest.approx(1 / 6)
    assert at[2.0] == 0.0
    assert bool((acc[1:] <= acc[:-1]).all())
    for r in radius.tolist():  # every distinct radius is on the grid
        assert r in at
    metrics.check_curve(grid, acc, 0.3, 2 / 6)
    with pytest.raises(AssertionError):
        metrics.check_curve(grid, acc, 0.3, 0.5)


def test_curve_matches_certify_at_every_epsilon(trained_digits_net):
    net, _, test = trained_digits_net
    x, y = test.x[:200], test.y[:200]
    cs = metrics.certify_batched(net, x, net.epsilon, "sound")
    correct = cs.pred == y
    grid = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.45], dtype=torch.float64)
    acc = metrics.certified_accuracy_curve(cs.radius, correct, grid)
    for e, a in zip(grid.tolist(), acc.tolist()):
        c = net.certify(x, epsilon=e)
        assert a == pytest.approx(metrics.vra(c.pred, c.certified, y), abs=1e-12)


def test_full_evaluation_orders_and_bounds(trained_digits_net):
    net, _, test = trained_digits_net
    x, y = test.x[:150], test.y[:150]
    res, arrays = evaluate_net(net, x, y, EvalOptions(lower_bounds=True, seed=0, **SMALL))
    m, lip = res["metrics"], res["lipschitz"]
    assert 0 < m["vra_sound"] <= m["pgd_accuracy"] <= m["clean_accuracy"]
    assert m["vra_sound"] <= m["vra_fast"] + 1e-12  # sound K ≥ fast K
    assert m["rejection_sound"] == pytest.approx(
        1 - float(arrays["radius"].gt(net.epsilon).double().mean())
    )
    assert res["pgd"]["certified_flipped_sound"] == 0
    assert res["pgd"]["max_perturbation_norm"] <= net.epsilon
    assert lip["global_ub_fast"] <= lip["global_ub_sound"]
    assert 0 < lip["global_lb"] <= lip["global_ub_sound"]
    assert 0 < lip["local_lb"] <= lip["local_lb_max"] <= lip["global_ub_sound"]
    grid, curve = arrays["grid"], arrays["curve"]
    assert bool((curve[1:] <= curve[:-1]).all())
    assert float(curve[grid == net.epsilon][0]) == pytest.approx(m["vra_sound"], abs=1e-12)


def test_lower_bound_above_upper_bound_raises(trained_digits_net):
    net, _, test = trained_digits_net
    lb = lower_bounds.global_lower_bound(net.backbone, test.x[:50], pairs=8, steps=5, lr=1e-2)
    K = lower_bounds.upper_bounds(net)["_K_sound"]
    lower_bounds.check_against_upper(lb, K, "Global")
    with pytest.raises(UnsoundBoundError):
        lower_bounds.check_against_upper(lb, K * 1e-3, "Global")


def test_exact_ratio_on_linear_model_equals_row_distance():
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    w = f[1].weight.detach()
    x1 = torch.randn(5, 4, dtype=torch.float64)
    x2 = torch.randn(5, 4, dtype=torch.float64)
    v, j, i = lower_bounds.exact_margin_ratios(f, x1, x2)
    ub = torch.linalg.vector_norm(w[j] - w[i], dim=1)
    assert bool((v <= ub * (1 + 1e-12)).all())
    # Along the direction w_j − w_i the ratio is exactly ‖w_j − w_i‖.
    d = (w[0] - w[1]).expand(5, 4)
    v, j, i = lower_bounds.exact_margin_ratios(f, x1, x1 + d, j=torch.zeros(5, dtype=torch.long))
    assert float(v.min()) >= float(torch.linalg.vector_norm(w[0] - w[1])) * (1 - 1e-12)


def test_fallback_section_adds_sound_vra(trained_digits_net):
    from torchgloro.evaluate.runner import EvalOptions, evaluate_net

    net, _, test = trained_digits_net
    res, _ = evaluate_net(
        net, test.x[:150], test.y[:150], EvalOptions(attack=None, fallback=True, seed=0)
    )
    fb = res["fallback"]
    assert fb["vra"] >= res["metrics"]["vra_sound"]
    assert fb["points_tried"] == round(res["metrics"]["rejection_sound"] * 150)
    assert 0 <= fb["points_added"] <= fb["points_tried"]
    # Printed by `gloro evaluate` (the summary), not only in evaluation.md.
    from torchgloro.evaluate.report import summary_tables

    assert f"Local-bound fallback: VRA {100 * fb['vra']:.1f}%" in summary_tables(res)
    del res["fallback"]
    assert "Local-bound fallback" not in summary_tables(res)


def test_bad_inputs_to_the_python_api_are_clear_errors(trained_digits_net):
    """Found by a review: raw RuntimeError/IndexError, or a wrong figure for ε = NaN."""
    import math

    from torch import nn

    import torchgloro as tg
    from torchgloro.evaluate import pgd_l2
    from torchgloro.evaluate.runner import EvalOptions, evaluate_net

    with pytest.raises(
        tg.GloroInputError, match=r"cannot run on inputs of shape in_shape=\(1, 28, 28\)"
    ):
        tg.GloroNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 0.3, in_shape=(1, 28, 28))
    net, _, test = trained_digits_net
    x, y = test.x[:20], test.y[:20]
    quick = EvalOptions(attack=None)
    with pytest.raises(tg.GloroInputError, match="x has 20 points but y has shape"):
        evaluate_net(net, x, y[:19], quick)
    with pytest.raises(tg.GloroInputError, match=r"labels must lie in \[0, 10\)"):
        evaluate_net(net, x, y + 8, quick)
    for eps in (math.nan, -1.0, 0.0):
        with pytest.raises(tg.GloroInputError, match="epsilon must be a finite number > 0"):
            pgd_l2(net.backbone, x, y, eps, steps=2)


def test_each_long_phase_shows_a_bar_with_an_eta(trained_digits_net, capsys):
    """Found by a user: `gloro evaluate --attack pgd --lower-bounds` printed nothing for
    minutes. Each phase now has a bar on stderr (elapsed<remaining), off on request."""
    net, _, test = trained_digits_net
    x, y = test.x[:40], test.y[:40]
    small = dict(pgd_steps=3, lower_bounds=True, lb_steps=3, lb_points=4, local_steps=3,
                 batch_size=16)  # fmt: skip
    evaluate_net(net, x, y, EvalOptions(**small))
    err = capsys.readouterr().err
    for phase in ("certify (sound)", "certify (fast)", "PGD", "global lower bound (4 pairs)",
                  "local lower bound (4 points)"):  # fmt: skip
        assert re.search(re.escape(phase) + r": .*\d+/\d+ \[\d\d:\d\d<", err), phase  # ETA
    evaluate_net(net, x, y, EvalOptions(**small, progress=False))
    assert capsys.readouterr().err == ""
