"""Bounds of linear layers beyond the built-ins: BatchNorm (eval), adaptive average pooling,
Conv1d, ConvTranspose2d.

Each is a proven upper bound on the operator norm of the layer's linear part, checked in
tests/bounds/test_bounds_layers.py against the dense Jacobian's norm in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds import sound
from torchgloro.bounds.registry import (
    ConstantBound,
    LayerBound,
    PowerIterationBound,
    linear_fp_terms,
    register_bound,
)
from torchgloro.bounds.sound_linalg import U64, sigma_max_upper
from torchgloro.margins import NORM_UNDERFLOW_F64, round_up

# 2^-150 (float32's largest subnormal rounding error) per γ₈ ≥ 8·2^-24: see BatchNormBound.
_SUBNORMAL_PER_GAMMA8 = 2.0**-129

__all__ = ["BatchNormBound", "Conv1dBound", "ConvTranspose2dBound", "adaptive_pool_norm"]


class BatchNormBound(LayerBound):
    """``BatchNorm1d/2d`` in eval mode: z ↦ α·(z − μ) + β per channel, α = w/√(σ² + eps).

    The running statistics μ, σ² make it a per-channel affine map, whose norm is
    max_c |α_c|. In training mode the layer normalizes by the batch's statistics instead;
    the training bound still uses the running ones (the function that is certified: sound
    certification always evaluates the net in eval mode).

    Round-off, in float64 or float32: PyTorch computes α̃ = w·(1/√(σ² + eps)) and either
    z·α̃ + (β − μ·α̃) (CPU) or ((z − μ)·(1/√(σ² + eps)))·w + β (CUDA), each in the input's
    precision or wider. Counting eps's own rounding to float32, the add, square root,
    reciprocal, the products and the shifts, no path has more than 8 roundings, so
    |err| ≤ γ₈(|α||z| + |β| + |αμ|), provided each rounding is relative. Two are not always:

    * eps rounded to float32 is off by u·eps, relative to σ² + eps only when σ² ≥ 0 and
      (eps or σ² + eps) is a normal float32; a negative running variance cancels it (a 13%
      error in the output, test_bounds_layers.py). Such layers are float64 only
      (:attr:`fp_terms_precision_free`); σ² + eps ≤ 0 is refused.
    * a product in the subnormal range is off by up to 2^-150 (float32) absolutely, and a
      later product scales it: α̃ by |z| (CPU), (z − μ)·invstd by |w| (CUDA). The terms add
      2^-150(|z| + |w| + 2) per entry as ``2^-129 = 2^-150/8u`` times (‖z‖ + √P‖w‖ + 2√D),
      which γ₈ turns back into at least that, at float64's u too (its 2^-1075 is smaller).
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, in_shape: tuple[int, ...]) -> None:
        if not layer.track_running_stats or layer.running_var is None:
            raise UnsupportedLayerError(
                f"{type(layer).__name__}(track_running_stats=False) normalizes every batch by "
                f"its own statistics, which mixes the points of a batch: no per-input bound "
                f"exists. Use track_running_stats=True (the default)."
            )
        super().__init__()
        object.__setattr__(self, "layer", layer)
        self.positions = math.prod(in_shape[1:])

    def _alpha(self, differentiable: bool) -> torch.Tensor:
        layer = self.layer
        inv = torch.rsqrt(layer.running_var.detach() + layer.eps)
        if layer.weight is None:
            return inv
        w = layer.weight if differentiable else layer.weight.detach()
        return w.abs() * inv

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        return self._alpha(differentiable and torch.is_grad_enabled()).max()

    def iterate(self, n_iter: int) -> None:
        pass  # exact: nothing to iterate

    @torch.no_grad()
    def _alpha64(self) -> torch.Tensor:
        layer = self.layer
        denom = layer.running_var.detach().double() + layer.eps
        if not bool((denom > 0).all()):
            raise UnsupportedLayerError(
                f"{type(layer).__name__} has running_var + eps <= 0 (or NaN) in some channel: "
                f"1/sqrt(running_var + eps) is not a finite scale. A variance is >= 0; reload "
                f"or recompute the running statistics."
            )
        # sqrt, add and divide: each rounds by ≤ u, so 1 + 8u covers the three.
        inv = 1 / torch.sqrt(denom)
        a = inv if layer.weight is None else layer.weight.detach().double().abs() * inv
        return a * (1 + 8 * U64)

    @property
    def fp_terms_precision_free(self) -> bool:  # type: ignore[override]
        """Whether eps rounded to float32 stays a relative u of σ² + eps (σ² ≥ 0 and eps or
        σ² + eps a normal float32), α is finite in float32, and the model holds at float32's
        u; otherwise the layer is certified on float64 alone."""
        layer = self.layer
        var, eps = layer.running_var.detach().double(), float(layer.eps)
        tiny, huge = float(torch.finfo(torch.float32).tiny), 1e36
        if not (bool((var >= 0).all()) and 0 <= eps <= huge):
            return False
        if eps < tiny and not bool((var + eps >= tiny).all()):
            return False
        return bool(torch.isfinite(var).all()) and float(self._alpha64().max()) < huge

    def sound(self) -> float:
        return round_up(self._alpha64().max().item(), 2)

    def fp_terms(self) -> tuple[int, float, float]:
        layer = self.layer
        a = self._alpha64()
        shift = layer.running_mean.detach().double().abs() * a
        if layer.bias is not None:
            shift = shift + layer.bias.detach().double().abs()
        b = (shift.norm().item() * (1 + 8 * U64) + NORM_UNDERFLOW_F64) * math.sqrt(self.positions)
        # Products in float32's subnormal range, scaled by a later factor (class docstring).
        w = torch.ones_like(a) if layer.weight is None else layer.weight.detach().double().abs()
        d = a.numel() * self.positions
        w_norm = (w.norm().item() + NORM_UNDERFLOW_F64) * math.sqrt(self.positions)
        sub_a, sub_b = _SUBNORMAL_PER_GAMMA8, _SUBNORMAL_PER_GAMMA8 * (w_norm + 2 * math.sqrt(d))
        A = round_up(a.max().item() + sub_a, 2)
        return 8, A, round_up((b + sub_b) * (1 + 1e-12), 4)

    def extra_repr(self) -> str:
        return "max_c |w_c| / sqrt(var_c + eps)"


register_bound(nn.BatchNorm1d, nn.BatchNorm2d)(BatchNormBound)


def _adaptive_windows(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) the 1-D adaptive average-pooling matrix (PyTorch's windows), float64."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_pool_norm(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, int]:
    """Proven ‖AdaptiveAvgPool2d‖₂ and its largest window (kh·kw).

    The pooling matrix is the Kronecker product of the two 1-D ones (each window is a
    product of a row range and a column range, divided by its size), so its norm is the
    product of theirs; entries fl(1/c) are within u of the exact ones (×(1 + 2u)).
    """
    norm, window = 1.0, 1
    for n_in, n_out in zip(in_hw, out_hw):
        m = _adaptive_windows(n_in, n_out)
        norm = round_up(norm * float(sigma_max_upper(m)) * (1 + 2 * U64), 4)
        window *= int((m > 0).sum(dim=1).max())
    return norm, window


@register_bound(nn.AdaptiveAvgPool2d)
def _adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, in_shape: tuple[int, ...]) -> LayerBound:
    size = module.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    out_hw = tuple(n if o is None else o for o, n in zip(size, in_shape[-2:]))
    value, k = adaptive_pool_norm(tuple(in_shape[-2:]), out_hw)  # type: ignore[arg-type]
    # As AvgPool2d: sums of at most k entries, then one division (|A| = A).
    return ConstantBound(value, "AdaptiveAvgPool2d", fp_terms=(k + 1, value, 0.0),
                         peak_gain=math.sqrt(k))  # fmt: skip


class Conv1dBound(PowerIterationBound):
    """``nn.Conv1d`` with zero padding: the 2-D bound of the same kernel on a 1×L image."""

    def __init__(self, layer: nn.Conv1d, in_shape: tuple[int, ...]) -> None:
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv1d with padding_mode={layer.padding_mode!r} is not supported: only zero "
                f"padding has a proven bound here. Use padding_mode='zeros'."
            )
        if layer.padding == "valid":
            self.pad = (0, 0)
        elif layer.padding == "same":
            total = layer.dilation[0] * (layer.kernel_size[0] - 1)
            self.pad = (total // 2, total - total // 2)
        else:
            self.pad = (layer.padding[0], layer.padding[0])
        super().__init__(layer, (1, *in_shape))

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return F.conv1d(F.pad(u, self.pad), weight, None, layer.stride, 0, layer.dilation,
                        layer.groups)  # fmt: skip

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        size = (1, self.u.shape[1], self.u.shape[2] + sum(self.pad))
        g = torch.nn.grad.conv1d_input(size, weight, v, layer.stride, 0, layer.dilation,
                                       layer.groups)  # fmt: skip
        return g[..., self.pad[0] : g.shape[2] - self.pad[1]]

    def _norm_upper(self, kernel: torch.Tensor, method: str = "auto") -> float:
        layer = self.layer
        return sound.conv2d_norm_upper(
            kernel.unsqueeze(2),
            (1, self.u.shape[2]),
            stride=(1, layer.stride[0]),
            padding=(*self.pad, 0, 0),
            dilation=(1, layer.dilation[0]),
            groups=layer.groups,
            method=method,
        )

    def sound(self) -> float:
        return self._norm_upper(self._weight().detach())

    def fp_terms(self) -> tuple[int, float, float]:
        w = self._weight().detach()
        n_out = self._op(self.u, w).shape[2]
        abs_norm = self._norm_upper(w.abs(), method="circular")
        return linear_fp_terms(w, self.layer.bias, positions=n_out, abs_norm_upper=abs_norm)


register_bound(nn.Conv1d)(Conv1dBound)


class ConvTranspose2dBound(PowerIterationBound):
    """``nn.ConvTranspose2d`` (zero padding): the adjoint of the convolution with the same
    weight, stride, padding, dilation and groups on the transposed layer's output size, so
    its norm is that convolution's (‖Aᵀ‖ = ‖A‖), bounded by ``conv2d_norm_upper``."""

    def __init__(self, layer: nn.ConvTranspose2d, in_shape: tuple[int, ...]) -> None:
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"ConvTranspose2d with padding_mode={layer.padding_mode!r} is not supported; "
                f"use padding_mode='zeros'."
            )
        super().__init__(layer, (1, *in_shape))
        with torch.no_grad():
            self.out_hw = tuple(self._op(self.u, layer.weight).shape[2:])

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return F.conv_transpose2d(u, weight, None, m.stride, m.padding, m.output_padding,
                                  m.groups, m.dilation)  # fmt: skip

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return F.conv2d(v, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def _norm_upper(self, kernel: torch.Tensor, method: str = "auto") -> float:
        m = self.layer
        return sound.conv2d_norm_upper(
            kernel, self.out_hw, m.stride, m.padding, m.dilation, m.groups, method=method
        )

    def sound(self) -> float:
        return self._norm_upper(self._weight().detach())

    def fp_terms(self) -> tuple[int, float, float]:
        # ‖|Aᵀ|‖ = ‖|A|‖: the terms of the convolution A, except that each output of Aᵀ sums
        # at most (in_channels/groups)·kh·kw products (plus the bias).
        m, w = self.layer, self._weight().detach()
        circular = self._norm_upper(w.abs(), method="circular")
        positions = math.prod(self.out_hw)
        _, abs_norm, b = linear_fp_terms(w, m.bias, positions, abs_norm_upper=circular)
        n = w.shape[0] // m.groups * math.prod(w.shape[2:]) + (m.bias is not None)
        return n, abs_norm, b


register_bound(nn.ConvTranspose2d)(ConvTranspose2dBound)
