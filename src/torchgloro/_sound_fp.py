"""Proven forward round-off bounds for a network evaluated in floating point.

Standard model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2 and
§3.1, eq. 3.4/3.5): for any summation order, ``|fl(Wx + b) − (Wx + b)| ≤ γ_{n+1}(|W||x| + |b|)``
entrywise, with ``n`` the dot-product length and ``γ_n = n·u/(1 − n·u)``; underflow adds at
most ``η`` per product (a tiny absolute term, included). Writing ``x̃`` for computed and ``x`` for
exact activations and ``e ≥ |x̃ − x|``:

* affine (Linear, Conv2d): ``e' = |W| e + γ_{n+1}(|W||x̃| + |b|)``;
* ReLU, max-pool, GroupSort/MinMax: exact in floating point and 1-Lipschitz in ℓ∞ per output
  (``e' = relu``-free ``e``, max of ``e`` over the window / group);
* Flatten, Identity, zero padding: exact re-indexing (``e' = `` the same re-indexing of ``e``);
* average pooling: ``e' = avg(e) + γ_{c+1}·avg(|x̃|)``.

The bound propagation itself is computed in floating point on non-negative numbers; each step
is inflated by ``(1 + 2γ_{n+3})`` which dominates its own round-off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import GloroInputError, UnsupportedLayerError
from torchgloro.activations import GroupSort

__all__ = ["abs_forward_error", "margin_rounding_slack", "prod_upper"]

#: Relative slack used by :func:`margin_rounding_slack` to absorb the float64 round-off of the
#: margin test itself (≫ the few ulps actually needed).
MARGIN_REL = 2.0**-40


def prod_upper(values: Iterable[float]) -> float:
    """Product of non-negative floats, rounded up at every step (a proven upper bound).

    Args:
        values: Non-negative finite floats.

    Returns:
        A float ``>=`` the exact product.
    """
    out = 1.0
    for v in values:
        v = float(v)
        if not (v >= 0.0 and math.isfinite(v)):
            raise GloroInputError(f"prod_upper needs non-negative finite values, got {v}.")
        out = 0.0 if (v == 0.0 or out == 0.0) else math.nextafter(out * v, math.inf)
    return out


def _unit(dtype: torch.dtype) -> tuple[float, float]:
    """(unit round-off, an absolute underflow allowance per operation) of a float dtype."""
    if dtype == torch.float64:
        return 2.0**-53, 2.0**-1021
    if dtype == torch.float32:
        return 2.0**-24, 2.0**-125
    raise GloroInputError(f"abs_forward_error supports float32/float64 inputs, got {dtype}.")


def _gam(n: int, u: float) -> float:
    if n * u >= 0.5:
        raise GloroInputError(f"dot products of length {n} are too long for the error model.")
    return n * u / (1.0 - n * u) * (1.0 + 4 * u)


def _exact_cast(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = t.detach().to(dtype)
    if not torch.equal(out.to(t.dtype), t.detach()):
        raise GloroInputError(
            f"{what} is not exactly representable in {dtype}; evaluate in float64 instead."
        )
    return out


_KINDS = {
    nn.Linear: "linear",
    nn.Conv2d: "conv2d",
    nn.ReLU: "relu",
    nn.Flatten: "flatten",
    nn.Unflatten: "flatten",
    nn.Identity: "identity",
    nn.ZeroPad2d: "pad",
    nn.AvgPool2d: "avgpool",
    nn.MaxPool2d: "maxpool",
}


def _kind_of(m: nn.Module) -> str:
    if isinstance(m, GroupSort):
        return "groupsort"
    kind = _KINDS.get(type(m))
    if kind is None:
        raise UnsupportedLayerError(
            f"abs_forward_error has no round-off rule for {type(m).__name__}; supported: "
            f"Linear, Conv2d, ReLU, Flatten, Unflatten, Identity, ZeroPad2d, AvgPool2d, "
            f"MaxPool2d, MinMax/GroupSort."
        )
    return kind


def _affine(m: nn.Module, x: torch.Tensor, e: torch.Tensor, kind: str, u: float, eta: float):
    w = _exact_cast(m.weight, x.dtype, f"{type(m).__name__} weight")
    b = None if m.bias is None else _exact_cast(m.bias, x.dtype, f"{type(m).__name__} bias")
    wa = w.abs()
    ba = None if b is None else b.abs()
    if kind == "linear":
        n = w.shape[1] + 1

        def op(v, ww, bb):
            return F.linear(v, ww, bb)
    else:
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise UnsupportedLayerError("only zero-padded Conv2d has a round-off rule.")
        n = w.shape[1] * w.shape[2] * w.shape[3] + 1

        def op(v, ww, bb):
            return F.conv2d(v, ww, bb, m.stride, m.padding, m.dilation, m.groups)

    y = op(x, w, b)
    g = _gam(n, u)
    prop = op(e, wa, None) + g * op(x.abs(), wa, ba) + n * eta
    return y, prop * (1.0 + 2 * _gam(n + 3, u))


def _group_max(e: torch.Tensor, size: int) -> torch.Tensor:
    c = e.shape[1]
    shape = (e.shape[0], c // size, size, *e.shape[2:])
    return e.reshape(shape).amax(dim=2, keepdim=True).expand(shape).reshape(e.shape)


@torch.no_grad()
def abs_forward_error(
    layers: Sequence[nn.Module | tuple[str, nn.Module]], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a feed-forward network in ``x.dtype`` and bounds the round-off of every logit.

    Args:
        layers: Modules (or ``(kind, module)`` pairs, kind in ``linear``, ``conv2d``,
            ``relu``, ``flatten``, ``identity``, ``pad``, ``avgpool``, ``maxpool``,
            ``minmax``, ``groupsort``), applied in order; ``nn.Sequential`` is expanded.
            Weights must be exactly representable in ``x.dtype``.
        x: The exact input batch, float64 (certification) or float32 (testing).

    Returns:
        ``(y, err)``: the computed outputs and a proven bound ``|y − f(x)| ≤ err``
        (entrywise) where ``f`` is the network in exact real arithmetic.
    """
    if not torch.isfinite(x).all():
        raise GloroInputError("input contains NaN or Inf.")
    u, eta = _unit(x.dtype)
    flat: list[tuple[str, nn.Module]] = []
    for item in layers:
        if isinstance(item, tuple):
            flat.append((str(item[0]).lower(), item[1]))
        elif isinstance(item, nn.Sequential):
            flat.extend((_kind_of(m), m) for m in item)
        else:
            flat.append((_kind_of(item), item))
    e = torch.zeros_like(x)
    for kind, m in flat:
        if kind in ("linear", "conv2d", "dense", "conv"):
            x, e = _affine(m, x, e, "linear" if kind in ("linear", "dense") else "conv2d", u, eta)
        elif kind == "relu":
            x = torch.relu(x)
        elif kind in ("flatten", "identity", "pad", "reshape"):
            x, e = m(x), m(e)
        elif kind == "maxpool":
            x, e = m(x), m(e)
        elif kind == "avgpool":
            k = m.kernel_size if isinstance(m.kernel_size, int) else math.prod(m.kernel_size)
            c = k * k if isinstance(m.kernel_size, int) else k
            gam = _gam(c + 2, u)
            x, e = m(x), (m(e) + gam * m(x.abs()) + eta) * (1.0 + 2 * gam)
        elif kind in ("minmax", "groupsort"):
            x, e = m(x), _group_max(e, getattr(m, "group_size", 2))
        else:
            raise UnsupportedLayerError(f"unknown layer kind {kind!r} in abs_forward_error.")
        if not torch.isfinite(e).all():
            raise GloroInputError("round-off bound overflowed; the activations are too large.")
    return x, e


def margin_rounding_slack(
    logits: torch.Tensor,
    logit_err: torch.Tensor,
    pred: torch.Tensor | None = None,
    eps_k: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Slack for the sound margin test ``y_pred − y_i − εK_{pred,i} > slack_i``.

    With ``|y − f(x)| ≤ logit_err`` (from :func:`abs_forward_error`), the exact margin
    ``f_pred − f_i`` is at least ``y_pred − y_i − (err_pred + err_i)``. The test is
    evaluated in float64, whose own round-off (a few ulps of ``|y_pred| + |y_i| + εK``) is
    covered by the extra relative term ``2^-40·(|y_pred| + |y_i| + εK)``.

    Args:
        logits: ``(B, C)`` computed logits (float64).
        logit_err: ``(B, C)`` round-off bounds.
        pred: ``(B,)`` predicted classes; defaults to ``argmax`` (first index on ties).
        eps_k: ``ε·K_{pred,i}``, broadcastable to ``(B, C)`` (an upper bound, rounded up).

    Returns:
        ``(B, C)`` float64 slack; certify iff ``y_pred − y_i − εK > slack`` for all
        ``i ≠ pred`` (strict, so ties are never certified).
    """
    y = logits.to(torch.float64)
    err = logit_err.to(torch.float64)
    if pred is None:
        pred = y.argmax(dim=1)
    idx = pred.view(-1, 1)
    y_p, e_p = y.gather(1, idx), err.gather(1, idx)
    ek = torch.as_tensor(eps_k, dtype=torch.float64).expand_as(y).abs()
    return (e_p + err) * (1.0 + MARGIN_REL) + MARGIN_REL * (y_p.abs() + y.abs() + ek)
