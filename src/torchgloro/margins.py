"""Pure math of the GloRo construction: class-pair bounds, the ⊥ logit, certified radii.

Functions marked *upper* round every step upward, so the result is a proven upper bound
when the inputs are (see docs/soundness.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = [
    "UNIT_ROUNDOFF_F64",
    "UNIT_ROUNDOFF_F32",
    "UNDERFLOW_F64",
    "UNDERFLOW_F32",
    "NORM_UNDERFLOW_F64",
    "round_up",
    "product_upper",
    "pairwise_row_distances",
    "row_norms",
    "bottom_logit",
    "certified_radius",
    "forward_error_coefficients",
    "times_upper",
    "gamma",
    "peak_magnitude_coefficients",
    "layerwise_error_coefficients",
]

UNIT_ROUNDOFF_F64 = 2.0**-53
UNIT_ROUNDOFF_F32 = 2.0**-24
# Absolute error per affine layer from products in the subnormal range: at most n·2^-1075
# (float64) or n·2^-150 (float32) per output, i.e. n·sqrt(m)·that in ℓ2 for m outputs. These
# constants dominate it for any n·sqrt(m) below 1e20 (float64) or 1e14 (float32).
UNDERFLOW_F64 = 1e-300
# A float64 2-norm is a plain sum of squares: squares below 2^-1022 lose up to 2^-1075 each,
# and those below 2^-1075 vanish, so entries under ~1e-154 made norms (and K) 0. The lost
# part is at most sqrt(D·2^-1074) < 1e-150 for D < 10^10 entries: added to every proven norm.
NORM_UNDERFLOW_F64 = 1e-150
UNDERFLOW_F32 = 1e-30


def round_up(x: float, ulps: int = 2) -> float:
    """``x`` nudged up by ``ulps`` units in the last place (toward +inf)."""
    for _ in range(ulps):
        x = math.nextafter(x, math.inf)
    return x


def product_upper(values: Iterable[float]) -> float:
    """A float64 product of non-negative factors, rounded up after every multiply."""
    out = 1.0
    for v in values:
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"a layer bound must be finite and >= 0, got {v}")
        out = 0.0 if (v == 0.0 or out == 0.0) else math.nextafter(out * v, math.inf)
    return out


def gamma(n: int, u: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u), or +inf once n·u ≥ 1/2.

    The bound |fl(Σ) − Σ| ≤ γ_n·Σ|·| needs n·u < 1; past it the formula turns negative (a
    float32 layer of 2^24 terms made every allowance negative). +inf leaves such points
    undecided, and float32 decisions are not used at all for such nets
    (``bounds.weight_cache._float32_model_applies``).
    """
    nu = n * u
    return math.inf if nu >= 0.5 else nu / (1 - nu)


def times_upper(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · b`` (non-negative float64) rounded up: one step toward +inf after the product.

    Round-to-nearest is off by at most half a unit in the last place, relative in the normal
    range but absolute (up to 2.5e-324) among subnormals, where a tiny product can even round
    to 0; the step up makes the result an upper bound in both ranges.
    """
    return torch.nextafter(a * b, torch.tensor(math.inf, dtype=a.dtype))


def pairwise_row_distances(w: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """``(C, C)`` matrix of ‖w_j − w_i‖₂ over the rows of ``w`` (C, D).

    Args:
        w: The last layer's weight, one row per class.
        upper: If True, compute in float64 from explicit differences and inflate by a
            proven relative round-off allowance, so every entry is an upper bound on the
            exact distance. If False, the fast, differentiable Gram form is used.
    """
    if upper:
        w = w.detach().to(torch.float64)
        out = torch.stack([torch.linalg.vector_norm(w - row, dim=1) for row in w])
        # diff: 1 rounding; sum of D squares: gamma_D; sqrt: 1 rounding → (D + 3)·u relative.
        rel = 2 * (w.shape[1] + 3) * UNIT_ROUNDOFF_F64
        return out * (1 + rel) + NORM_UNDERFLOW_F64
    sq = (w * w).sum(1)  # (C,)
    d2 = sq[:, None] + sq[None, :] - 2 * (w @ w.t())  # (C, C)
    return d2.clamp_min(1e-12).sqrt()


def row_norms(w: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """``(C,)`` ‖w_i‖₂ per row; with ``upper``, a proven float64 upper bound."""
    if upper:
        w = w.detach().to(torch.float64)
        rel = 2 * (w.shape[1] + 2) * UNIT_ROUNDOFF_F64
        return torch.linalg.vector_norm(w, dim=1) * (1 + rel) + NORM_UNDERFLOW_F64
    return torch.linalg.vector_norm(w, dim=1)


def bottom_logit(y: torch.Tensor, K: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """The ⊥ logit, ``max_{i≠j} (y_i + ε·K_ji)`` with ``j = argmax y`` (first index on ties).

    Args:
        y: ``(B, C)`` logits of the backbone.
        K: ``(C, C)`` margin bounds (K[j, i] for f_j − f_i), or ``(C,)`` per-class bounds
            for the basic variant, where K_ji := K_j + K_i.
        epsilon: 0-dim radius.

    Returns:
        ``(B,)`` the ⊥ logit.
    """
    j = y.argmax(dim=1)  # (B,)
    if K.dim() == 2:
        Kj = K[j]  # (B, C)
    else:
        Kj = K[j].unsqueeze(1) + K.unsqueeze(0)  # (B, C)
    cand = y + epsilon * Kj  # (B, C)
    return cand.scatter(1, j.unsqueeze(1), float("-inf")).amax(dim=1)  # (B,): i ≠ j only


def certified_radius(
    y: torch.Tensor, K: torch.Tensor, slack: torch.Tensor, lipschitz: str = "margin"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point prediction and certified radius.

    The radius is ``min_{i≠j} (y_j − y_i − slack) / K_ji`` clamped at 0, scaled down by a few
    ulps so that ``radius > ε`` implies ``y_j − y_i − slack > ε·K_ji`` exactly. A tie for the
    top logit has margin 0 and hence radius 0: never certified.

    Args:
        y: ``(B, C)`` logits.
        K: ``(C, C)`` or ``(C,)`` bounds as in :func:`bottom_logit`.
        slack: ``(B,)`` proven bound on the round-off error of any margin y_j − y_i, or
            ``(B, C)`` with ``slack[b, i]`` bounding that of y_j − y_i, j the argmax of row b.
        lipschitz: ``"margin"`` or ``"basic"``, matching the shape of ``K``.

    Returns:
        ``(pred, radius)``, both ``(B,)``.
    """
    j = y.argmax(dim=1)  # (B,)
    Kj = K[j] if lipschitz == "margin" else K[j].unsqueeze(1) + K.unsqueeze(0)  # (B, C)
    yj = y.gather(1, j[:, None])  # (B, 1)
    eps_rel = 8 * torch.finfo(y.dtype).eps
    # Round-off of the subtraction itself, on top of the forward-pass slack.
    slack = slack if slack.dim() == 2 else slack[:, None]  # (B, C) or (B, 1)
    margin = (yj - y).sub_(slack).sub_(y.abs().add_(yj.abs()).mul_(eps_rel))  # (B, C)
    # K_ji = 0: margin/0 is +inf (certified at any radius), -inf or 0/0 (never): NaN → 0.
    ratio = margin.div_(Kj).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    ratio = ratio.mul_(1 - eps_rel).scatter_(1, j[:, None], math.inf)  # i ≠ j only
    radius = ratio.amin(dim=1).clamp_min_(0.0)  # (B,)
    # Any other logit equal to the top one (a tie) must give radius exactly 0.
    tie = (y == yj).sum(dim=1) > 1
    return j, radius.masked_fill_(tie, 0.0)


def forward_error_coefficients(
    layers: Iterable[tuple[float, tuple[int, float, float] | None]],
    unit_roundoff: float = UNIT_ROUNDOFF_F64,
    underflow: float = 0.0,
) -> tuple[float, float]:
    """Coefficients ``(p, q)`` with ‖fl(f(x)) − f(x)‖₂ ≤ p·‖x‖₂ + q for every input x.

    ``f`` is a chain of layers, each given as ``(L, terms)``: ``L`` a proven bound on its
    operator norm, and ``terms`` as in :meth:`LayerBound.fp_terms` (``None`` for layers that
    are computed exactly and map 0 to 0). With h the exact and h̃ the computed activations,
    a layer with ``terms = (n, A, b)`` satisfies, componentwise, |fl(W h̃ + b) − (W h̃ + b)| ≤
    γ_n (|W||h̃| + |b|) (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1),
    so in ℓ2: e' ≤ γ_n (A (N + e) + b) + L e, while ‖h‖ grows as N' ≤ L N + b.
    Both bounds are affine in ‖x‖₂ and are tracked as (coefficient, constant) pairs.
    ``underflow`` is added to the error of every affine layer: it covers products that fall
    into the subnormal range, whose error is absolute rather than relative (Higham §2.1).
    """
    (p, q), _ = _error_recursion(layers, unit_roundoff, underflow)
    return p, q


def peak_magnitude_coefficients(
    layers: Iterable[tuple[float, tuple[int, float, float] | None]],
    unit_roundoff: float,
    underflow: float = 0.0,
) -> tuple[float, float]:
    """``(a, b)`` with every value computed on the way to fl(f(x)) at most a·‖x‖₂ + b.

    Covers each layer's outputs and, for an affine layer, every partial sum of its dot
    products (≤ (1 + γ_n)(A‖h̃‖ + ‖b‖)). A layer may come as ``(L, terms, peak)``, ``peak``
    being :meth:`~torchgloro.bounds.registry.LayerBound.peak_terms` (or None): values inside the
    layer beyond that model (a Residual block's inner layers, a pool's window sums). When
    a·‖x‖ + b stays far below the largest float of the evaluation precision, no intermediate
    value overflowed, which the round-off model of :func:`forward_error_coefficients` assumes.
    """
    _, peak = _error_recursion(layers, unit_roundoff, underflow)
    return peak


def layerwise_error_coefficients(
    layers: Iterable[tuple[float, tuple[int, float, float] | None]],
    unit_roundoff: float,
    underflow: float = 0.0,
) -> tuple[list[float], float]:
    """``(c, d)`` with ‖fl(f(x)) − f(x)‖₂ ≤ Σ_l c_l·‖h̃_l‖₂ + d, per input, a posteriori.

    ``h̃_l`` is the *computed* input of layer l (measured during the pass). Layer l adds at
    most γ_n (A‖h̃_l‖ + b) + ``underflow`` of its own round-off, and every later layer scales
    an incoming error by at most its bound L, so with P_l the product of the later bounds,
    c_l = γ_n·A·P_l and d = Σ_l (γ_n·b + underflow)·P_l (c_l = 0 for exact layers). Tighter
    than :func:`forward_error_coefficients`, which bounds ‖h̃_l‖ a priori.
    """
    layers = list(layers)
    u = unit_roundoff
    coefs, const = [], 0.0
    for i, (_, terms, *_) in enumerate(layers):
        if terms is None:
            coefs.append(0.0)
            continue
        later = product_upper(L for L, *_ in layers[i + 1 :])
        n, A, b = terms
        g = gamma(n, u)
        coefs.append(round_up(g * A * later * 1.001, 4))
        const += (g * b + underflow) * later
    return coefs, round_up(const * 1.001, 4)


def _error_recursion(layers, u: float, underflow: float):
    n_coef, n_const = 1.0, 0.0  # ‖h‖ ≤ n_coef·‖x‖ + n_const
    e_coef, e_const = 0.0, 0.0  # ‖h̃ − h‖ ≤ e_coef·‖x‖ + e_const
    s_coef, s_const = 1.0, 0.0  # every value so far ≤ s_coef·‖x‖ + s_const
    for L, terms, *rest in layers:
        # A layer whose internal values can exceed its partial-sum model (a Residual block's
        # inner layers, a pool's window sums) reports them: ≤ a·‖h̃‖ + c for its input h̃.
        peak = rest[0](u) if rest and rest[0] is not None else None
        if peak is not None:
            a, c = peak
            s_coef = max(s_coef, a * (n_coef + e_coef))
            s_const = max(s_const, a * (n_const + e_const) + c)
        if terms is None:
            n_coef, n_const, e_coef, e_const = L * n_coef, L * n_const, L * e_coef, L * e_const
            inner = (0.0, 0.0)
        else:
            n, A, b = terms
            g = gamma(n, u)
            inner = (
                (1 + g) * A * (n_coef + e_coef),
                (1 + g) * (A * (n_const + e_const) + b),
            )
            e_coef, e_const = (
                g * A * (n_coef + e_coef) + L * e_coef,
                g * (A * (n_const + e_const) + b) + L * e_const + underflow,
            )
            n_coef, n_const = L * n_coef, L * n_const + b
        s_coef = max(s_coef, inner[0], n_coef + e_coef)
        s_const = max(s_const, inner[1], n_const + e_const)
    # A generous factor covers the round-off of this very recursion.
    err = (round_up(e_coef * 1.001, 4), round_up(e_const * 1.001, 4))
    return err, (round_up(s_coef * 1.001, 4), round_up(s_const * 1.001, 4))
