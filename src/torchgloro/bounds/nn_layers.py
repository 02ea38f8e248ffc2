"""Bounds of :mod:`torchgloro.nn.layers`: LiResBlock, LLNLinear and Residual.

Each is registered with :func:`~torchgloro.bounds.registry.register_bound` on import;
importing :mod:`torchgloro.bounds` imports this module. The layers are plain modules; why their
derived weights (folded kernels, normalized rows) are computed in float32 is told there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds import sound
from torchgloro.bounds.registry import (
    DenseBound,
    LayerBound,
    PowerIterationBound,
    bound_for,
    flatten_layers,
    linear_fp_terms,
    register_bound,
    small_conv,
    trace_input_shapes,
)
from torchgloro.margins import (
    UNDERFLOW_F32,
    UNDERFLOW_F64,
    UNIT_ROUNDOFF_F64,
    forward_error_coefficients,
    peak_magnitude_coefficients,
    product_upper,
    round_up,
)
from torchgloro.nn.layers import LiResBlock, LLNLinear, Residual

__all__ = ["LiResBlockBound", "LLNLinearBound", "ResidualBound"]


class LiResBlockBound(PowerIterationBound):
    """:class:`LiResBlock`: power iteration and proven bound on the folded convolution.

    The operator is ``x ↦ conv2d(x, K', padding=k//2)`` with ``K' = γ ⊙ (I + α·W)``; its
    adjoint is the transposed convolution with the same padding (stride 1, odd kernel).
    """

    def __init__(self, layer: LiResBlock, in_shape: tuple[int, ...]) -> None:
        if len(in_shape) != 3 or in_shape[0] != layer.channels:
            raise UnsupportedLayerError(
                f"LiResBlock({layer.channels}) needs (C={layer.channels}, H, W) inputs, got "
                f"{in_shape}."
            )
        super().__init__(layer, (1, *in_shape))
        self._native_cpu = small_conv(layer.conv.weight.shape, math.prod(in_shape[1:]))

    def _weight(self) -> torch.Tensor:
        return self.layer.folded_kernel()

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(u, weight, None, padding=self.layer.padding)

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(v, weight, None, padding=self.layer.padding)

    def _op_weight_grad(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor):
        p = self.layer.padding
        return torch.nn.grad.conv2d_weight(u, weight.shape, v, padding=p)

    def sound(self) -> float:
        p = self.layer.padding
        return sound.conv2d_norm_upper(
            self.layer.folded_kernel().detach(), tuple(self.u.shape[2:]), stride=1, padding=(p, p)
        )

    def fp_terms(self) -> tuple[int, float, float]:
        # Evaluated as one convolution with the folded kernel; the bias once per position.
        k, p = self.layer.folded_kernel().detach(), self.layer.padding
        abs_norm = sound.conv2d_norm_upper(k.abs(), tuple(self.u.shape[2:]), padding=(p, p))
        positions = self.u.shape[2:].numel()
        return linear_fp_terms(k, self.layer.bias, positions, abs_norm_upper=abs_norm)


class LLNLinearBound(DenseBound):
    """:class:`LLNLinear` used inside a network: a dense bound on the effective weight."""

    def _weight(self) -> torch.Tensor:
        return self.layer.effective_weight()

    def sound(self) -> float:
        return sound.dense_norm_upper(self.layer.effective_weight().detach())


class ResidualBound(LayerBound):
    """:class:`Residual` ``x + g(x)``: bound ``1 + ∏ bound(g_k)`` over g's layers.

    Floating point (:meth:`fp_terms`). With ``h̃`` the computed input (‖h̃ − h‖ ≤ e, ‖h‖ ≤ N),
    the block computes ``fl(h̃ + g̃(h̃))`` where ``g̃`` is the float evaluation of g. Let
    ``L_g`` be g's proven bound, ``(p, q)`` its forward-error coefficients
    (‖g̃(z) − g(z)‖ ≤ p‖z‖ + q, :func:`torchgloro.margins.forward_error_coefficients` over
    g's layers) and ``B ≥ ‖g(0)‖`` (from the layers' bias terms). One more rounding for the
    add (|fl(a+b) − (a+b)| ≤ u|a+b| componentwise) gives

        e' ≤ (1 + L_g)·e + [p + u(1 + L_g + p)]·(N + e) + (1 + u)·q + u·B,
        N' ≤ (1 + L_g)·N + B.

    This is exactly the per-layer model ``e' ≤ γ_n(A(N + e) + b) + L e``, ``N' ≤ L N + b``
    of :func:`~torchgloro.margins.forward_error_coefficients` with ``n = 1``
    (γ₁ = u/(1 − u) ≥ u), ``L = 1 + L_g``, ``A = [p + u(1 + L_g + p)]/γ₁`` and
    ``b = B + ((1 + u)q + uB)/γ₁``: ``b ≥ B`` keeps the norm recursion valid, and
    ``γ₁·b ≥ (1 + u)q + uB`` covers the constant error terms. ``A`` and ``b`` are not a
    literal ‖|W|‖ and ‖bias‖, but they are what the recursion needs, and they are rounded up.
    ``unit_roundoff`` (float64's by default) is the ``u`` of the evaluation precision.
    """

    unit_roundoff: float = UNIT_ROUNDOFF_F64
    fp_terms_precision_free = False  # its terms include unit_roundoff

    def __init__(self, layer: Residual, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)
        layers = flatten_layers(layer.inner)
        shapes = trace_input_shapes([*layers, nn.Identity()], in_shape)
        if tuple(shapes[-1]) != tuple(in_shape):
            raise UnsupportedLayerError(
                f"Residual needs a shape-preserving inner block: input {tuple(in_shape)}, "
                f"inner output {tuple(shapes[-1])}."
            )
        self.inner = nn.ModuleList(bound_for(m, s) for m, s in zip(layers, shapes[:-1]))

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        k = None
        for b in self.inner:
            v = b.estimate(n_iter=n_iter, differentiable=differentiable)
            k = v if k is None else k * v
        if k is None:  # g = identity of an empty Sequential: x + x
            return torch.tensor(2.0)
        return 1 + k

    def iterate(self, n_iter: int) -> None:
        for b in self.inner:
            b.iterate(n_iter)

    @torch.no_grad()
    def converge(self, tol: float = 1e-5, max_iter: int = 10_000) -> torch.Tensor:
        for b in self.inner:
            b.converge(tol=tol, max_iter=max_iter)
        return self.estimate()

    def sound(self) -> float:
        return round_up(1.0 + product_upper(b.sound() for b in self.inner), 2)

    def fp_terms(self) -> tuple[int, float, float]:
        u = self.unit_roundoff
        norms = [b.sound() for b in self.inner]
        terms = [b.fp_terms() for b in self.inner]
        # The inner layers' own subnormal-range errors, at the evaluation precision, grow
        # with the later inner layers' gains: they enter q, not once after the block.
        low = UNDERFLOW_F64 if u == UNIT_ROUNDOFF_F64 else UNDERFLOW_F32
        p, q = forward_error_coefficients(zip(norms, terms), unit_roundoff=u, underflow=low)
        big_b = 0.0  # ‖g(0)‖ ≤ B: the norm recursion N' ≤ L N + b from N = 0
        for L, t in zip(norms, terms):
            big_b = round_up(L * big_b + (t[2] if t is not None else 0.0), 2)
        l_g = product_upper(norms)
        gamma1 = u / (1 - u)
        a = round_up((p + u * (1 + l_g + p) * 1.01) / gamma1 * 1.01, 4)
        b = round_up(big_b + ((1 + u) * q + u * big_b) / gamma1 * 1.01, 4)
        return 1, a, b

    def peak_terms(self, unit_roundoff: float) -> tuple[float, float]:
        # The inner layers' values (their outputs and partial sums), from the block's input:
        # (1, a, b) above models only the block's output.
        low = UNDERFLOW_F64 if unit_roundoff == UNIT_ROUNDOFF_F64 else UNDERFLOW_F32
        chain = [(b.sound(), b.fp_terms(), b.peak_terms) for b in self.inner]
        return peak_magnitude_coefficients(chain, unit_roundoff, underflow=low)

    def extra_repr(self) -> str:
        return "x + g(x)"


register_bound(LiResBlock)(LiResBlockBound)
register_bound(LLNLinear)(LLNLinearBound)
register_bound(Residual)(ResidualBound)
