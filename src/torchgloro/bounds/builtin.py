"""Bounds of the built-in layers: dense, convolution, activations, padding and pooling.

Each is registered with :func:`torchgloro.bounds.registry.register_bound` on import;
``torchgloro.bounds.registry`` imports this module, so every built-in layer is known as soon as
the registry is.
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
    small_conv,
)
from torchgloro.nn.activations import GroupSort, MinMax


class DenseBound(PowerIterationBound):
    """``nn.Linear``: power iteration on W; sound bound from a float64 SVD."""

    def __init__(self, layer: nn.Linear, in_shape: tuple[int, ...]) -> None:
        if len(in_shape) != 1:
            raise UnsupportedLayerError(
                f"{type(layer).__name__} applied to an input of shape {tuple(in_shape)} (per "
                f"sample) is not supported: its bound and round-off model are for a flat "
                f"(features,) input, not one applied at every position. Put nn.Flatten() "
                f"before it, or use a 1x1 nn.Conv2d for a per-position map."
            )
        super().__init__(layer, (layer.in_features,))

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight @ u

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() @ v

    def sound(self) -> float:
        return sound.dense_norm_upper(self.layer.weight.detach())

    def fp_terms(self) -> tuple[int, float, float]:
        w = self._weight().detach()
        return linear_fp_terms(w, self.layer.bias, abs_norm_upper=sound.dense_norm_upper(w.abs()))


class Conv2dBound(PowerIterationBound):
    """``nn.Conv2d`` with zero padding, any stride, dilation and groups.

    The iteration runs on the exact operator: the convolution (no bias) with the layer's own
    stride/padding/dilation/groups, and its transpose.
    """

    def __init__(self, layer: nn.Conv2d, in_shape: tuple[int, ...]) -> None:
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv2d with padding_mode={layer.padding_mode!r} is not supported: only zero "
                f"padding has a proven bound here. Use padding_mode='zeros'."
            )
        self.padding = _numeric_padding(layer, in_shape)  # (left, right, top, bottom)
        super().__init__(layer, (1, *in_shape))
        left, right, top, bottom = self.padding
        # Symmetric padding (the usual case) is passed to the convolution itself: no F.pad
        # copy in A u, and Aᵀ v comes out already cropped. Same operator, fewer ops.
        self._sym_pad = (top, left) if (left == right and top == bottom) else None
        self._stride = tuple(layer.stride)
        self._dilation = tuple(layer.dilation)
        # Aᵀ is a transposed convolution; output_padding makes it return exactly the
        # (padded) input shape, which floor division in the forward shape may have lost.
        pad = self._sym_pad or (0, 0)
        padded = (in_shape[1] + (0 if self._sym_pad else top + bottom),
                  in_shape[2] + (0 if self._sym_pad else left + right))  # fmt: skip
        with torch.no_grad():
            out_hw = self._op(self.u, layer.weight).shape[2:]
        self._out_pad = tuple(
            n - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
            for n, o, st, p, d, k in zip(
                padded, out_hw, self._stride, pad, self._dilation, layer.kernel_size
            )
        )
        self._native_cpu = small_conv(layer.weight.shape, out_hw.numel())

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self._sym_pad is not None:
            return F.conv2d(u, weight, None, self._stride, self._sym_pad, self._dilation,
                            layer.groups)  # fmt: skip
        return F.conv2d(
            F.pad(u, self.padding), weight, None, layer.stride, 0, layer.dilation, layer.groups
        )

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        groups = self.layer.groups
        if self._sym_pad is not None:
            return F.conv_transpose2d(v, weight, None, self._stride, self._sym_pad,
                                      self._out_pad, groups, self._dilation)  # fmt: skip
        left, right, top, bottom = self.padding
        g = F.conv_transpose2d(v, weight, None, self._stride, 0, self._out_pad, groups,
                               self._dilation)  # fmt: skip
        return g[..., top : g.shape[2] - bottom, left : g.shape[3] - right]

    def _op_weight_grad(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor):
        layer = self.layer
        pad = self._sym_pad
        if pad is None:
            u, pad = F.pad(u, self.padding), (0, 0)
        return torch.nn.grad.conv2d_weight(
            u, weight.shape, v, self._stride, pad, self._dilation, layer.groups
        )

    def sound(self) -> float:
        return self._norm_upper(self.layer.weight.detach())

    def _norm_upper(self, kernel: torch.Tensor, method: str = "auto") -> float:
        layer = self.layer
        return sound.conv2d_norm_upper(
            kernel,
            tuple(self.u.shape[2:]),
            stride=layer.stride,
            padding=self.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            method=method,
        )

    def fp_terms(self) -> tuple[int, float, float]:
        # Bias is added once per output position: ‖b‖ over the output map.
        w = self.layer.weight.detach()
        n_out = self._op(self.u, w).shape[2:].numel()
        return linear_fp_terms(
            w,
            self.layer.bias,
            positions=n_out,
            # Only scales the tiny round-off slack: the cheap circular bound is enough.
            abs_norm_upper=self._norm_upper(w.abs(), method="circular"),
        )


def _numeric_padding(layer: nn.Conv2d, in_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The conv's zero padding as (left, right, top, bottom), resolving 'same'/'valid'."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":  # stride 1 only (PyTorch rule): extra padding goes right/bottom
        pads = []
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


register_bound(nn.Linear)(DenseBound)
register_bound(nn.Conv2d)(Conv2dBound)


@register_bound(nn.ReLU, nn.Flatten, nn.Identity, nn.Unflatten, MinMax, GroupSort)
def _one(module: nn.Module, in_shape: tuple[int, ...]) -> LayerBound:
    return ConstantBound(1.0, module.__class__.__name__)


@register_bound(nn.ZeroPad2d)
def _zero_pad(module: nn.ZeroPad2d, in_shape: tuple[int, ...]) -> LayerBound:
    if any(p < 0 for p in module.padding):
        raise UnsupportedLayerError("ZeroPad2d with negative padding (cropping) is not supported.")
    if module.value != 0:  # NaN too; the round-off model assumes padding maps 0 to 0
        raise UnsupportedLayerError(
            f"ZeroPad2d with value={module.value!r} is not supported: a padded constant is "
            f"not bounded by the round-off model (it can cancel inside the next layer). Pad "
            f"with value = 0, or fold the constant into the next layer's bias."
        )
    return ConstantBound(1.0, "ZeroPad2d")


@register_bound(nn.AvgPool2d)
def _avg_pool(module: nn.AvgPool2d, in_shape: tuple[int, ...]) -> LayerBound:
    if module.ceil_mode or module.divisor_override is not None:
        raise UnsupportedLayerError(
            "AvgPool2d with ceil_mode=True or divisor_override is not supported; use the defaults."
        )
    no_padding = module.padding in (0, (0, 0))  # then count_include_pad changes nothing
    value = sound.avgpool2d_norm(
        module.kernel_size,
        module.stride,
        module.padding,
        in_hw=tuple(in_shape[-2:]),
        count_include_pad=module.count_include_pad or no_padding,
    )
    k = module.kernel_size if isinstance(module.kernel_size, int) else math.prod(module.kernel_size)
    k = k * k if isinstance(module.kernel_size, int) else k
    # Non-negative weights: |A| = A. One division adds one more rounding. PyTorch sums each
    # window before dividing, so the partial sums reach sqrt(k)·‖h‖ (Cauchy–Schwarz over at
    # most k entries), k times A's partial sums: the overflow guard must know.
    return ConstantBound(value, "AvgPool2d", fp_terms=(k + 1, value, 0.0), peak_gain=math.sqrt(k))


@register_bound(nn.MaxPool2d)
def _max_pool(module: nn.MaxPool2d, in_shape: tuple[int, ...]) -> LayerBound:
    if module.ceil_mode:
        raise UnsupportedLayerError("MaxPool2d with ceil_mode=True is not supported.")
    if module.return_indices:
        raise UnsupportedLayerError(
            "MaxPool2d with return_indices=True is not supported in a backbone (it returns a "
            "tuple); use return_indices=False."
        )
    value = sound.maxpool2d_norm(module.kernel_size, module.stride, module.padding, module.dilation)
    return ConstantBound(value, "MaxPool2d")
