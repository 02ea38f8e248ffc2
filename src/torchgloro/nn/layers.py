"""Extra layers with proven Lipschitz bounds: LiResNet blocks, residual wrappers, LLN heads.

* :class:`LiResBlock` — the linear residual block of LiResNet (Hu et al., NeurIPS 2023):
  ``y = γ ⊙ (x + α·conv(x)) + β``. The whole block is *one* convolution with the folded kernel
  ``K' = γ ⊙ (I + α·W)`` (``I`` the identity kernel), and that is how it is computed and
  bounded: power iteration and the proven bound run on the folded operator, which is much
  tighter than ``1 + α‖W‖``.
* :class:`Residual` — a general residual connection ``x + g(x)`` around an ``nn.Sequential``
  of supported layers, bounded by ``1 + ∏ bound(g_k)``.
* :class:`LLNLinear` — last-layer normalization: the logits use unit-norm rows
  ``s·w_i/‖w_i‖``; GloroNet reads them through :meth:`LLNLinear.effective_weight`.

Float64 consistency (why folding is done in float32). Sound certification evaluates a float64
*copy* of the backbone, while the proven norms come from the float32 layers. Both must
describe the very same linear map. A derived weight (a folded kernel, a normalized row) is
therefore always computed in float32 from the float32-representable parameters, with one
separately rounded operation at a time, and only then cast to the parameter dtype. The
float64 copy computes bit-for-bit the same derived weight, so the operator it evaluates is
exactly the operator that was bounded. (Consequently these layers do not support parameters
that are not exactly representable in float32.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import GloroInputError, UnsupportedLayerError
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

__all__ = [
    "LiResBlock",
    "Residual",
    "LLNLinear",
    "LiResBlockBound",
    "ResidualBound",
    "LLNLinearBound",
]


# ---- layers ----------------------------------------------------------------------------------


class LiResBlock(nn.Module):
    """Linear residual block ``y = γ ⊙ (x + α·conv(x)) + β`` (stride 1, SAME zero padding).

    The block is evaluated as a single convolution with the folded kernel
    ``K' = γ ⊙ (I + α·W)`` (see :meth:`folded_kernel`), so its operator is exactly the one
    whose norm is bounded. The inner ``conv`` is an ``nn.Conv2d`` (no bias) only to hold ``W``:
    :func:`torchgloro.nn.models.create_model` initializes it like every other convolution.

    Args:
        channels: Input and output channels.
        kernel_size: Odd kernel size (the identity sits at the kernel's center).
        residual_scale: α, the fixed weight of the convolution branch.
        bias: Whether to add a per-channel bias β after the block.
        affine: Whether to learn a per-channel scale γ (initialized to 1).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        residual_scale: float = 1.0,
        bias: bool = True,
        affine: bool = False,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise GloroInputError(f"LiResBlock needs channels >= 1, got {channels}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise GloroInputError(
                f"LiResBlock needs an odd kernel_size (the identity kernel is centered), got "
                f"{kernel_size}."
            )
        alpha = float(residual_scale)
        if not math.isfinite(alpha):
            raise GloroInputError(f"residual_scale must be finite, got {residual_scale!r}.")
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.residual_scale = alpha
        self.padding = kernel_size // 2
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=self.padding, bias=False)
        nn.init.xavier_uniform_(self.conv.weight)
        self.scale = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def folded_kernel(self) -> torch.Tensor:
        """``(C, C, k, k)`` kernel ``γ ⊙ (I + α·W)`` of the whole block (differentiable).

        Computed in float32, one rounded operation at a time, then cast to the weight dtype
        (see the module docstring), so float32 and float64 copies agree bit for bit.
        """
        w = self.conv.weight
        c, k, m = self.channels, self.kernel_size, self.padding
        w32 = w.to(torch.float32)
        eye = torch.zeros(c, c, k, k, dtype=torch.float32, device=w.device)
        eye[:, :, m, m] = torch.eye(c, dtype=torch.float32, device=w.device)
        # A Python scalar, not a new tensor: no host-to-device copy (CUDA-graph safe); a
        # float32 tensor times a scalar rounds the scalar to float32 first, as a tensor would.
        kernel = w32 * float(self.residual_scale)
        kernel = kernel + eye
        if self.scale is not None:
            kernel = kernel * self.scale.to(torch.float32)[:, None, None, None]
        return kernel.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.folded_kernel(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, "
            f"residual_scale={self.residual_scale:g}, bias={self.bias is not None}, "
            f"affine={self.scale is not None}"
        )


class Residual(nn.Module):
    """A residual connection ``x ↦ x + g(x)`` around a shape-preserving ``g``.

    ``g`` must be an ``nn.Sequential`` (possibly nested) of layers with registered bounds;
    its Lipschitz bound is the product of theirs, and the block's is ``1 + bound(g)``.
    For a purely linear ``g`` (one convolution), prefer :class:`LiResBlock`, whose folded
    bound is much tighter.

    Args:
        inner: ``g``; a single module is wrapped in an ``nn.Sequential``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner if type(inner) is nn.Sequential else nn.Sequential(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class LLNLinear(nn.Module):
    """Dense layer with last-layer normalization: logits ``s·(w_i/‖w_i‖)·x + b_i``.

    Used as the head of a GloRo net, the pairwise bounds become ``K_ij = ‖w'_j − w'_i‖·K_pen``
    on the normalized rows ``w'`` returned by :meth:`effective_weight`, which keeps the
    class-pair constants from drifting apart (Singla et al., 2022; Hu et al., 2023).

    Args:
        in_features: Input width.
        out_features: Number of outputs (classes).
        bias: Whether to add a bias (it does not enter the Lipschitz bound).
        scale: The row norm ``s`` after normalization.
        learn_scale: Whether ``s`` is a learnable parameter (else a fixed buffer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise GloroInputError(
                f"LLNLinear needs positive sizes, got ({in_features}, {out_features})."
            )
        if not (math.isfinite(scale) and scale > 0):
            raise GloroInputError(f"LLNLinear scale must be finite and > 0, got {scale!r}.")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        s = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s)

    def effective_weight(self) -> torch.Tensor:
        """``(out, in)`` the weight the layer actually applies: ``s·w_i/‖w_i‖`` per row.

        Computed in float32 and cast to the weight dtype (see the module docstring).
        """
        w = self.weight
        w32 = w.to(torch.float32)
        norms = torch.linalg.vector_norm(w32, dim=1, keepdim=True).clamp_min(1e-12)
        out = w32 / norms
        out = out * self.scale.to(torch.float32)
        return out.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, learn_scale={isinstance(self.scale, nn.Parameter)}"
        )


# ---- bounds ----------------------------------------------------------------------------------


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
