"""Checks of what users pass in: the radius ε and input batches."""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from torchgloro._certify import NON_FINITE_INPUT
from torchgloro._errors import GloroInputError
from torchgloro.bounds.trace import writes_in_place

__all__ = [
    "check_epsilon",
    "epsilon_tensor",
    "round_up_to_float32",
    "check_input",
    "check_one_label_each",
    "unshared",
]


def check_epsilon(epsilon: float) -> float:
    """Returns ``epsilon`` as a float, or raises if it is not a finite positive number."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise GloroInputError(f"epsilon must be a number, got {epsilon!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise GloroInputError(
            f"epsilon must be a finite number > 0 (the ℓ2 radius to certify), got {epsilon!r}."
        )
    return value


def epsilon_tensor(epsilon: float) -> torch.Tensor:
    """ε as the float32 buffer that holds it, rounded up (a certificate never covers less
    than the radius asked for); raises if float32 cannot represent it."""
    value = torch.tensor(check_epsilon(epsilon), dtype=torch.float64)
    up = round_up_to_float32(value)
    if not (math.isfinite(float(up)) and float(value.to(torch.float32)) > 0):
        raise GloroInputError(
            f"epsilon={epsilon!r} is outside float32's range, where the net keeps it; pass a "
            f"radius between 1e-38 and 3e38 (or pass epsilon= to certify for one call)."
        )
    return up


def round_up_to_float32(k: torch.Tensor) -> torch.Tensor:
    """The least float32 tensor ≥ ``k`` elementwise (a bound must not shrink when stored)."""
    k32 = k.to(torch.float32)
    below = k32.to(k.dtype) < k
    return torch.where(below, torch.nextafter(k32, torch.full_like(k32, float("inf"))), k32)


def check_input(x: torch.Tensor, in_shape: tuple[int, ...], check_finite: bool) -> None:
    """Raises :class:`GloroInputError` unless ``x`` is a floating-point ``(B, *in_shape)``
    batch (and, with ``check_finite``, free of NaN and Inf)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise GloroInputError(
            f"GloroNet expects a floating-point tensor, got "
            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}."
        )
    if x.dim() != len(in_shape) + 1 or tuple(x.shape[1:]) != in_shape:
        hint = " Add a batch dimension with x.unsqueeze(0)." if tuple(x.shape) == in_shape else ""
        raise GloroInputError(
            f"Expected input of shape (B, {', '.join(map(str, in_shape))}), got "
            f"{tuple(x.shape)}.{hint}"
        )
    # One cheap reduction first; the elementwise test only if the sum is not finite
    # (NaN/Inf input, or a finite input whose sum overflows).
    if check_finite and not bool(x.sum().isfinite()) and not bool(x.isfinite().all()):
        raise GloroInputError(NON_FINITE_INPUT)


def check_one_label_each(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raises :class:`GloroInputError` unless ``y`` is ``(N,)`` for the N points of ``x``."""
    if y.shape != x.shape[:1]:
        raise GloroInputError(
            f"x has {x.shape[0]} points but y has shape {tuple(y.shape)}: one label per point."
        )


def unshared(x: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """``x``, or a copy of it where a layer of ``backbone`` writes its input in place
    (``nn.ReLU(inplace=True)``, or in a traced graph ``F.relu(h, inplace=True)``):
    certifying must not change the caller's data."""
    if any(getattr(m, "inplace", False) for m in backbone.modules()):
        return x.clone()
    if isinstance(backbone, fx.GraphModule) and any(
        writes_in_place(backbone, n) for n in backbone.graph.nodes
    ):
        return x.clone()
    return x
