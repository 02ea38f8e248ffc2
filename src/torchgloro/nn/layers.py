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

Their bounds, registered for them, are in :mod:`torchgloro.bounds.nn_layers`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = ["LiResBlock", "Residual", "LLNLinear"]


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
        # A layer of g that writes its input in place (nn.ELU(alpha=2, inplace=True) first)
        # would change the x that is added: the block would compute g1(x) + g'(g1(x)), whose
        # Lipschitz constant can exceed the bound 1 + L_g. g gets its own copy then.
        writes = any(getattr(m, "inplace", False) for m in self.inner.modules())
        return x + self.inner(x.clone() if writes else x)


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
