"""Proven (sound) upper bounds on layer operator norms, and float64 round-off bounds.

Power iteration approaches a spectral norm from *below*, so a certificate built on it can be
wrong. Everything here returns a number that is proven to be at least the exact ℓ2 operator
norm (or the exact round-off), including the floating-point error of computing it. The
arguments are in docs/soundness.md.

Example:
    >>> import torch
    >>> from torchgloro.bounds.sound import dense_norm_upper, conv2d_norm_upper
    >>> dense_norm_upper(torch.eye(3) * 2.0) >= 2.0
    True
    >>> w = torch.randn(16, 1, 4, 4)
    >>> b = conv2d_norm_upper(w, (28, 28), stride=2, padding="same")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchgloro._errors import GloroInputError
from torchgloro.bounds.sound_conv import (
    conv_bound,
    dilate_kernel,
    explicit_matrix,
    pair,
    polyphase_kernel,
    resolve_padding,
    space_to_depth,
)
from torchgloro.bounds.sound_linalg import U64, sigma_max_upper
from torchgloro.margins import product_upper as prod_upper
from torchgloro.margins import round_up

__all__ = [
    "round_up",
    "prod_upper",
    "dense_norm_upper",
    "conv2d_norm_upper",
    "avgpool2d_norm",
    "maxpool2d_norm",
    "resolve_padding",
    "polyphase_kernel",
    "space_to_depth",
    "dilate_kernel",
    "explicit_matrix",
]


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    t = t.detach().to(torch.float64).cpu()
    if not torch.isfinite(t).all():
        raise GloroInputError(f"{what} contains NaN or Inf; no bound exists. Check the weights.")
    return t


def dense_norm_upper(weight: torch.Tensor) -> float:
    """Proven upper bound on ``‖W‖₂`` for ``W`` of shape ``(out, in)``.

    The float64 Gram matrix of the smaller side is formed (round-off ``≤ γ_n·‖W‖_F²``), its
    top eigenvalue estimated by ``eigvalsh`` and then *verified* by a Cholesky factorization
    of ``t·I − G`` with Demmel's backward-error bound (docs/soundness.md, "Dense").
    The result is within about ``1e-9`` (relative) of the exact norm.

    Args:
        weight: ``(out, in)`` tensor, any float dtype (converted exactly to float64).

    Returns:
        A float ``>= ‖W‖₂``.

    Raises:
        GloroInputError: If ``weight`` is not 2-D or has NaN/Inf.
    """
    if weight.dim() != 2:
        raise GloroInputError(f"dense weight must be 2-D (out, in), got {tuple(weight.shape)}.")
    w = _check_finite(weight, "dense weight")
    if w.numel() == 0:
        return 0.0
    return round_up(float(sigma_max_upper(w)), 4)


def conv2d_norm_upper(
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    stride: int | Sequence[int] = (1, 1),
    padding: str | int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    groups: int = 1,
    method: str = "auto",
) -> float:
    """Proven upper bound on the operator norm of ``x ↦ conv2d(x, weight, ...)``.

    The bias is ignored (it does not change the Lipschitz constant). Zero padding only.

    Args:
        weight: ``(Cout, Cin/groups, kh, kw)``.
        in_hw: Spatial size ``(H, W)`` of the input.
        stride: int or pair.
        padding: ``"same"`` (TensorFlow SAME, asymmetric for even kernels), ``"valid"``, an
            int, ``(pad_h, pad_w)``, or ``(left, right, top, bottom)`` as for ``F.pad``.
        dilation: int or pair.
        groups: Number of groups.
        method: ``"auto"`` (the smaller of the circular bound and, for operators with at
            most 6400 rows or columns per group, the verified norm of the exact operator),
            ``"circular"`` or ``"exact"``.

    Returns:
        A float ``>=`` the exact ℓ2 operator norm.

    Raises:
        GloroInputError: Bad shapes, NaN/Inf weights, or an input smaller than the kernel.
    """
    if weight.dim() != 4:
        raise GloroInputError(f"conv weight must be 4-D, got shape {tuple(weight.shape)}.")
    if groups < 1 or weight.shape[0] % groups:
        raise GloroInputError(f"groups={groups} must divide Cout={weight.shape[0]}.")
    w = _check_finite(weight, "conv weight")
    hw = pair(in_hw, "in_hw")
    st, dl = pair(stride, "stride"), pair(dilation, "dilation")
    if min(st) < 1 or min(dl) < 1 or min(hw) < 1:
        raise GloroInputError("stride, dilation and in_hw must be positive.")
    pad = resolve_padding(padding, hw, tuple(w.shape[2:]), st, dl)  # type: ignore[arg-type]
    if w.numel() == 0:
        return 0.0
    return round_up(conv_bound(w, hw, st, pad, dl, groups, method), 4)


def avgpool2d_norm(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    in_hw: tuple[int, int] | None = None,
    count_include_pad: bool = True,
) -> float:
    """Proven upper bound (exact when tight) on the ℓ2 norm of ``AvgPool2d``.

    Non-overlapping windows (stride ≥ kernel): each row of the operator holds ``kh·kw``
    entries ``1/(kh·kw)`` on disjoint supports, so the norm is ``1/sqrt(kh·kw)`` (``0.5``
    for 2×2). Overlapping windows: the pooling is the depthwise convolution with the
    constant kernel ``1/(kh·kw)``, bounded by :func:`conv2d_norm_upper` (needs ``in_hw``).
    With ``count_include_pad=False`` border windows average fewer inputs; the exact
    single-channel matrix is built and verified (needs ``in_hw``).

    Args:
        kernel_size: int or pair.
        stride: int or pair; defaults to ``kernel_size``.
        padding: int or pair (symmetric, as in ``nn.AvgPool2d``).
        in_hw: Input spatial size, required for overlapping windows or
            ``count_include_pad=False``.
        count_include_pad: As in ``nn.AvgPool2d``.

    Returns:
        A float ``>=`` the operator norm.
    """
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    p = pair(padding, "padding")
    if min(k) < 1 or min(s) < 1:
        raise GloroInputError("avg-pool kernel_size and stride must be positive.")
    overlap = s[0] < k[0] or s[1] < k[1]
    if count_include_pad and not overlap:
        c = k[0] * k[1]
        r = math.isqrt(c)
        if r * r == c and r & (r - 1) == 0:  # 1/r is exact for r a power of two
            return 1.0 / r
        return round_up(1.0 / math.sqrt(c), 2)
    if in_hw is None:
        raise GloroInputError(
            "avgpool2d_norm needs in_hw for overlapping windows or count_include_pad=False."
        )
    hw = pair(in_hw, "in_hw")
    pad4 = (p[1], p[1], p[0], p[0])
    if count_include_pad:
        # Stored kernel fl(1/(kh·kw)) = exact·(1+δ), |δ| ≤ u: a scalar multiple, so the exact
        # norm is at most the stored one times 1/(1-u) ≤ 1 + 2u.
        w = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        val = conv_bound(w, hw, s, pad4, (1, 1), 1)
        return round_up(val * (1.0 + 2 * U64), 4)
    t = _avgpool_matrix(k, s, p, hw)
    # Entries are 1/c rounded (relative error ≤ u) and non-negative: ‖T_exact‖ ≤ (1+2u)‖T‖.
    return round_up(float(sigma_max_upper(t)) * (1.0 + 2 * U64), 4)


def _avgpool_matrix(k, s, p, hw) -> torch.Tensor:
    """Exact single-channel AvgPool2d(count_include_pad=False) matrix (entries fl(1/c))."""
    n = hw[0] * hw[1]
    if n > 4096:
        raise GloroInputError(
            f"avgpool2d_norm with count_include_pad=False is limited to inputs of at most "
            f"4096 pixels, got {hw}; use count_include_pad=True."
        )
    oh = (hw[0] + 2 * p[0] - k[0]) // s[0] + 1
    ow = (hw[1] + 2 * p[1] - k[1]) // s[1] + 1
    t = torch.zeros(oh * ow, n, dtype=torch.float64)
    for i in range(oh):
        rows = [r for r in range(i * s[0] - p[0], i * s[0] - p[0] + k[0]) if 0 <= r < hw[0]]
        for j in range(ow):
            cols = [c for c in range(j * s[1] - p[1], j * s[1] - p[1] + k[1]) if 0 <= c < hw[1]]
            idx = [r * hw[1] + c for r in rows for c in cols]
            if idx:
                t[i * ow + j, idx] = 1.0 / len(idx)
    return t


def maxpool2d_norm(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> float:
    """Proven ℓ2 Lipschitz bound of ``MaxPool2d``: ``sqrt(m)``.

    ``m`` is the largest number of windows any input lies in: per dimension at most
    ``ceil(k·gcd(d, s)/s)``. Then ``‖mp(x) − mp(y)‖² ≤ Σ_w max_{i∈w}|x_i − y_i|² ≤
    Σ_w Σ_{i∈w}|x_i − y_i|² ≤ m‖x − y‖²``. Non-overlapping windows give exactly 1.

    Args:
        kernel_size: int or pair.
        stride: int or pair; defaults to ``kernel_size``.
        padding: int or pair (implicit ``-inf`` padding does not change the bound).
        dilation: int or pair.

    Returns:
        ``sqrt(m)`` rounded up (``1.0`` when windows do not overlap).
    """
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    pair(padding, "padding")
    d = pair(dilation, "dilation")
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise GloroInputError("max-pool kernel_size, stride and dilation must be positive.")
    m = 1
    for kk, ss, dd in zip(k, s, d):
        m *= min(kk, -(-kk * math.gcd(dd, ss) // ss))
    r = math.isqrt(m)
    return float(r) if r * r == m else round_up(math.sqrt(m), 2)
