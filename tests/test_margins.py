"""Known answers and properties of the pure math in torchgloro.margins."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from torchgloro import margins

K3 = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def test_certified_radius_known_answers_scalar_and_per_pair_slack():
    y = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    # one slack for every margin: min((3 - 1 - 0.5) / 2, (3 - 0 - 0.5) / 1) = 0.75
    pred, r = margins.certified_radius(y, K3, torch.tensor([0.5], dtype=torch.float64))
    assert int(pred[0]) == 0 and float(r[0]) == pytest.approx(0.75, rel=1e-14)
    assert float(r[0]) < 0.75  # scaled down by a few ulps, never up
    # a slack per class pair: the pair (0, 2) now binds: (3 - 0 - 2.8) / 1 = 0.2
    s = torch.tensor([[0.0, 0.5, 2.8]], dtype=torch.float64)
    _, r = margins.certified_radius(y, K3, s)
    assert float(r[0]) == pytest.approx(0.2, rel=1e-12) and float(r[0]) < 0.2
    # slack past the margin: radius 0, not negative
    _, r = margins.certified_radius(y, K3, torch.tensor([[0.0, 5.0, 0.0]], dtype=torch.float64))
    assert float(r[0]) == 0.0


def test_certified_radius_basic_variant_adds_the_two_class_bounds():
    y = torch.tensor([[0.0, 4.0, 1.0]], dtype=torch.float64)
    Kc = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # K_ji = K_j + K_i, j = 1
    pred, r = margins.certified_radius(y, Kc, torch.zeros(1, dtype=torch.float64), "basic")
    assert int(pred[0]) == 1
    assert float(r[0]) == pytest.approx(min(4.0 / 1.5, 3.0 / 2.5), rel=1e-14)


def test_ties_get_radius_zero_whatever_the_slack():
    y = torch.tensor([[2.0, 2.0, -9.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    _, r = margins.certified_radius(y, K3, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(r, torch.zeros(2, dtype=torch.float64))


def test_a_zero_class_pair_bound_certifies_only_a_positive_margin():
    """K_ji = 0 (identical head rows): a positive margin holds at every radius, a zero or
    negative one (after slack) at none, and a NaN logit certifies nothing."""
    K0 = torch.zeros(2, 2, dtype=torch.float64)
    y = torch.tensor([[3.0, 1.0], [3.0, 1.0], [3.0, 1.0], [float("nan"), 0.0]], dtype=torch.float64)
    s = torch.tensor([0.0, 2.0, 3.0, 0.0], dtype=torch.float64)  # margins 2, 0⁻, −1, NaN
    _, r = margins.certified_radius(y, K0, s)
    assert math.isinf(float(r[0])) and r[1:].tolist() == [0.0, 0.0, 0.0]
    # beside a pair with K > 0, the zero pair does not bind: min(∞, (3 − (−9)) / 1)
    K = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    _, r = margins.certified_radius(torch.tensor([[3.0, 1.0, -9.0]], dtype=torch.float64), K, s[:1])
    assert float(r[0]) == pytest.approx(12.0, rel=1e-12) and float(r[0]) < 12.0


def test_radius_above_eps_implies_the_exact_margin_test():
    """radius > ε ⇒ y_j − y_i − slack_ji > ε·K_ji for every i ≠ j, checked in exact rationals."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(400, 5, generator=g, dtype=torch.float64) * 3
    K = torch.rand(5, 5, generator=g, dtype=torch.float64) + 0.1
    s = torch.rand(400, 5, generator=g, dtype=torch.float64) * 0.5
    pred, r = margins.certified_radius(y, K, s)
    n_checked = 0
    for b in range(400):
        eps = float(r[b]) * (1 - 1e-15)  # just below the radius: must still be certified
        if not eps > 0:
            continue
        j = int(pred[b])
        for i in range(5):
            if i != j:
                lhs = Fraction(float(y[b, j])) - Fraction(float(y[b, i])) - Fraction(float(s[b, i]))
                assert lhs > Fraction(eps) * Fraction(float(K[j, i]))
        n_checked += 1
    assert n_checked > 100


def test_bottom_logit_known_answer():
    y = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    bot = margins.bottom_logit(y, K3, torch.tensor(0.5, dtype=torch.float64))
    assert float(bot[0]) == pytest.approx(max(1.0 + 0.5 * 2.0, 0.0 + 0.5 * 1.0))


def test_product_upper_and_round_up_never_round_down():
    vals = [1.1, 3.7, 0.3, 2.9, 1e-3]
    exact = math.prod(Fraction(v) for v in vals)
    assert Fraction(margins.product_upper(vals)) >= exact
    assert margins.product_upper([2.0, 0.0, 5.0]) == 0.0
    assert margins.round_up(1.0, 2) > 1.0
    with pytest.raises(ValueError, match="finite and >= 0"):
        margins.product_upper([1.0, -1.0])


def test_gamma_is_infinite_where_highams_bound_stops_holding():
    """Found by a review: n·u/(1 − n·u) for a float32 layer of 2^24 terms is negative, which
    made every float32 allowance negative and certified a point at 1e8 times its radius."""
    import math

    from torchgloro import margins
    from torchgloro._certify import _norm_upper
    from torchgloro.bounds.weight_cache import _terms_fit_float32

    u32 = margins.UNIT_ROUNDOFF_F32
    assert margins.gamma(3, u32) == pytest.approx(3 * u32 / (1 - 3 * u32))
    assert margins.gamma(2**24 + 1, u32) == math.inf and margins.gamma(2**23, u32) == math.inf
    assert 0 < margins.gamma(2**22, u32) < 1
    coefs, const = margins.layerwise_error_coefficients([(1.0, (2**24 + 1, 1.0, 1.0))], u32)
    assert coefs[0] == math.inf and const == math.inf  # never a negative allowance
    assert not _terms_fit_float32([(1.0, (2**24 + 1, 1.0, 0.0)), (1.0, None)])
    assert _terms_fit_float32([(1.0, (4097, 1.0, 0.0)), (1.0, None)])
    wide = torch.ones(1, 2**22)
    assert float(_norm_upper(wide)[0]) == math.inf  # past the norm model: decided in float64
    assert float(_norm_upper(wide[:, :100])[0]) >= 10.0


def test_proven_norms_cover_squares_lost_to_underflow():
    """Found by a review: a float64 head whose rows differ by 1e-200 got ‖w_0 − w_1‖ = 2e-308
    (the squares underflow), K 1e108 times too small, and a certified radius of 4e57."""
    from torchgloro import margins
    from torchgloro.bounds.registry import linear_fp_terms

    w = torch.tensor([[1e-200, 1e-200], [0.0, 0.0]], dtype=torch.float64)
    exact = 2**0.5 * 1e-200
    assert float(margins.pairwise_row_distances(w, upper=True)[0, 1]) >= exact
    assert float(margins.row_norms(w, upper=True)[0]) >= exact
    _, _, b = linear_fp_terms(torch.eye(2, dtype=torch.float64), torch.full((2,), 1e-163))
    assert b >= 2**0.5 * 1e-163
