"""Bounds of elementwise activations and dropout: Lipschitz constant = largest |slope|.

An activation σ applied entrywise has ℓ2 Lipschitz constant sup_z |σ'(z)| (each entry moves
by at most that factor, and the sup is approached by perturbing one entry where the slope
peaks), so each bound below is that maximum slope, proven in docs/bounds.md.

Round-off: ReLU6 and Dropout in eval mode are exact in floating point, Hardtanh too when its
limits are float32 numbers; LeakyReLU rounds its slope and one product. The smooth ones call
elementary functions (exp, log1p, tanh, erf) that are not correctly rounded; their model
assumes each computed entry is within ``γ₁₆·c·(|z| + 1)`` of the exact value, 16 unit
round-offs of the evaluation precision (float64 or float32), against the ≤ 1–2 ulp
documented for SLEEF, glibc and CUDA's libdevice in either precision and the few arithmetic
roundings around them. GELU runs on PyTorch's own kernel in certified float32 passes (not
oneDNN's undocumented polynomial:
``_fp_env.own_gelu_kernel``), whose error is at most 1.73 units on every finite float32
input (docs/soundness.md §14b). Dense grids in both precisions check the model
(tests/bounds/test_elementwise.py). Constants are rounded to the input's precision before
use: LeakyReLU's slope counts one rounding more, Hardtanh's limits an absolute term.
Softplus's switch to the identity is an absolute error instead, which keeps
Softplus on the float64 path (:func:`softplus_jump`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds.registry import (
    ConstantBound,
    LayerBound,
    float32_relative,
    register_bound,
)
from torchgloro.margins import round_up

__all__ = ["gelu_max_slope", "silu_max_slope", "softplus_jump", "SmoothActivationBound"]

# The round-off model's number of unit round-offs per entry of a smooth activation.
_ULPS = 16
# Softplus computes e^{βz} for βz ≤ threshold: below 709.78 it stays finite in float64.
_SOFTPLUS_MAX_THRESHOLD = 700.0


def gelu_max_slope() -> float:
    """Proven upper bound (within 1e-15) on sup |GELU'| = Φ(√2) + √2·φ(√2) ≈ 1.1289.

    GELU'(z) = Φ(z) + zφ(z) and GELU''(z) = φ(z)(2 − z²): the slope peaks at z = √2 and dips
    to its minimum 1 − GELU'(√2) ≈ −0.129 at z = −√2, tending to 0 and 1 at ∓∞.
    """
    r = math.sqrt(2.0)
    phi = math.exp(-1.0) / math.sqrt(2 * math.pi)  # φ(√2) = e^{-1}/√(2π)
    return round_up(0.5 * (1 + math.erf(1.0)) + r * phi, 16)  # Φ(√2) = (1 + erf(1))/2


def silu_max_slope() -> float:
    """Proven upper bound (within 1e-12) on sup |SiLU'| ≈ 1.0998.

    SiLU'(z) = σ(z)(1 + z(1 − σ(z))), SiLU''(z) = σ(1 − σ)(2 − z·tanh(z/2)), and
    SiLU'(−z) = 1 − SiLU'(z): the slope peaks at the unique root z* > 0 of z·tanh(z/2) = 2
    (z·tanh(z/2) increases on z > 0) and dips to 1 − SiLU'(z*) at −z*. Bisection brackets
    z* within 1e-13; there |SiLU''| ≤ |SiLU'''|·1e-13 ≤ 1e-13, so the value at the bracket's
    midpoint is within 1e-26 of the peak, and 1e-12 covers the float evaluation.
    """
    lo, hi = 2.0, 3.0  # 2·tanh(1) < 2 < 3·tanh(1.5)
    while hi - lo > 1e-13:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mid * math.tanh(mid / 2) < 2 else (lo, mid)
    z = 0.5 * (lo + hi)
    s = 1 / (1 + math.exp(-z))
    return s * (1 + z * (1 - s)) + 1e-12


def softplus_jump(beta: float, threshold: float) -> float:
    """Proven upper bound on sup |softplus_β(z) − z| over the z that PyTorch's Softplus maps to
    the identity (βz > threshold): log1p(e^{−βz})/β decreases in z, so the sup is
    log1p(e^{−threshold})/β, the jump of the computed function at z = threshold/β.

    The exact softplus_β(z) = log1p(e^{βz})/β is 1-Lipschitz; PyTorch's is discontinuous
    there (it drops by this jump), so it has no Lipschitz bound at all. The bound is for the
    smooth function, and the jump is an error of the computed one, per entry. A relative
    1e-9 covers the evaluation here and a threshold test on a rounded βz (off by a relative
    2^-53, which moves the sup by a factor e^{|threshold|·2^-53}) for |threshold| < 10^6.
    """
    t = -threshold  # log1p(e^t) = max(t, 0) + log1p(e^{−|t|}), without overflow
    return (max(t, 0.0) + math.log1p(math.exp(-abs(t)))) / beta * (1 + 1e-9)


class SmoothActivationBound(ConstantBound):
    """An activation with a proven maximum slope, computed through elementary functions.

    Args:
        value: The proven maximum |slope|.
        name: The layer's name.
        in_shape: Its per-sample input shape (d = the number of entries).
        scale: ``c`` of the round-off model, ≥ max(1, value, |σ(0)|).
        jump: A discontinuity of the computed function (Softplus's switch to the identity),
            added to every entry's error. It is absolute, not a multiple of the unit
            round-off: carried as ``γ₁₆·b`` at float64's u, so it holds in float32 too but
            2^29× too large there, and the layer keeps sound certification on float64.
    """

    def __init__(
        self, value: float, name: str, in_shape: tuple[int, ...], scale: float, jump: float = 0.0
    ) -> None:
        d = math.prod(in_shape)
        c = max(scale, value, 1.0)
        gamma = _ULPS * 2.0**-53 / (1 - _ULPS * 2.0**-53)  # γ₁₆ for float64
        b = round_up(c * math.sqrt(d) * (1 + 1e-12) + jump * math.sqrt(d) / gamma, 4)
        super().__init__(value, name, fp_terms=(_ULPS, c, b))
        self.fp_terms_precision_free = jump == 0.0


@register_bound(nn.Hardtanh, nn.ReLU6)
def _hardtanh(module: nn.Hardtanh, in_shape: tuple[int, ...]) -> LayerBound:
    if not module.min_val <= 0 <= module.max_val:
        raise UnsupportedLayerError(
            f"{type(module).__name__}(min_val={module.min_val}, max_val={module.max_val}) does "
            f"not map 0 to 0, which its exact round-off model needs; use a range that contains 0."
        )
    # A clamp (slope ≤ 1), exact but for its limits, which a float32 pass rounds to float32:
    # clamp(z, fl(lo), fl(hi)) is within max|fl(v) − v| ≤ u·max(|lo|, |hi|) of the exact one.
    lo, hi = float(module.min_val), float(module.max_val)
    name = type(module).__name__
    if all(float(torch.tensor(v, dtype=torch.float32)) == v for v in (lo, hi)):
        return ConstantBound(1.0, name)
    b = round_up(max(abs(lo), abs(hi)) * math.sqrt(math.prod(in_shape)) * (1 + 1e-12), 4)
    return ConstantBound(1.0, name, fp_terms=(1, 0.0, b), precision_free=float32_relative(lo, hi))


@register_bound(nn.Dropout, nn.Dropout1d, nn.Dropout2d)
def _dropout(module: nn.Module, in_shape: tuple[int, ...]) -> LayerBound:
    # The identity in eval mode, where certification runs (training-mode masks are not).
    return ConstantBound(1.0, type(module).__name__)


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, in_shape: tuple[int, ...]) -> LayerBound:
    slope = float(module.negative_slope)
    a = abs(slope)
    # z or fl(z·fl(a)) (a rounded to the input's precision first): |err| ≤ γ₂·a·|z|.
    return ConstantBound(max(1.0, a), "LeakyReLU", fp_terms=(2, a, 0.0),
                         precision_free=float32_relative(slope))  # fmt: skip


@register_bound(nn.Tanh)
def _tanh(module: nn.Tanh, in_shape: tuple[int, ...]) -> LayerBound:
    return SmoothActivationBound(1.0, "Tanh", in_shape, scale=1.0)


@register_bound(nn.Sigmoid)
def _sigmoid(module: nn.Sigmoid, in_shape: tuple[int, ...]) -> LayerBound:
    return SmoothActivationBound(0.25, "Sigmoid", in_shape, scale=1.0)


@register_bound(nn.SiLU)
def _silu(module: nn.SiLU, in_shape: tuple[int, ...]) -> LayerBound:
    return SmoothActivationBound(silu_max_slope(), "SiLU", in_shape, scale=1.0)


@register_bound(nn.GELU)
def _gelu(module: nn.GELU, in_shape: tuple[int, ...]) -> LayerBound:
    if module.approximate != "none":
        raise UnsupportedLayerError(
            f"GELU(approximate={module.approximate!r}) has no proven bound here; use "
            f"nn.GELU() (the exact erf form, max slope 1.1289)."
        )
    return SmoothActivationBound(gelu_max_slope(), "GELU", in_shape, scale=1.0)


@register_bound(nn.ELU)
def _elu(module: nn.ELU, in_shape: tuple[int, ...]) -> LayerBound:
    alpha = float(module.alpha)
    if alpha < 0:
        raise UnsupportedLayerError(f"ELU with alpha={alpha} < 0 is not supported; use alpha >= 0.")
    # Slope 1 for z > 0 and α·e^z < α for z ≤ 0.
    return SmoothActivationBound(max(1.0, alpha), "ELU", in_shape, scale=max(1.0, alpha))


@register_bound(nn.Softplus)
def _softplus(module: nn.Softplus, in_shape: tuple[int, ...]) -> LayerBound:
    beta, t = float(module.beta), float(module.threshold)
    if beta <= 0:
        raise UnsupportedLayerError(f"Softplus with beta={beta} <= 0 is not supported.")
    if not t <= _SOFTPLUS_MAX_THRESHOLD:
        raise UnsupportedLayerError(
            f"Softplus(threshold={t}) computes e^(beta*z) up to beta*z = {t}, which overflows "
            f"float64 past 709.78: an inf that a later layer may turn into a finite, wrong "
            f"value. Use threshold <= {_SOFTPLUS_MAX_THRESHOLD:g} (the default 20 is fine)."
        )
    # Slope σ(βz) < 1 (its sup, 1, also that of the identity above the threshold). PyTorch
    # switches to the identity where βz > threshold: a jump, carried as an error per entry.
    jump = softplus_jump(beta, t)
    return SmoothActivationBound(1.0, "Softplus", in_shape, scale=max(1.0, 1 / beta), jump=jump)
