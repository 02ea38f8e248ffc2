"""Typed schedules for ε, λ and the learning rate (Appendix B), plus their string parsers.

Every schedule is a frozen dataclass with ``value(t, total)``: ``t`` is the training progress
in (fractional) epochs, so schedules can be applied per batch, and ``total`` the number of
epochs. Strings such as ``"0,2,500"`` or ``"decay_to_1e-6"`` are parsed only at the
config/CLI edge, by :func:`parse_epsilon_schedule`, :func:`parse_lambda_schedule` and
:func:`parse_lr_schedule`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torchgloro._errors import ConfigError

__all__ = [
    "SingleEpsilon",
    "LinearEpsilon",
    "LogEpsilon",
    "ConstantLambda",
    "LinearLambda",
    "ConstantLR",
    "DecayToLR",
    "parse_epsilon_schedule",
    "parse_lambda_schedule",
    "parse_lr_schedule",
    "scale_schedule",
]

# ε may never be 0 for a GloRo net: ramps start at this fraction of the target instead.
_EPS_FLOOR = 1e-6


@dataclass(frozen=True)
class SingleEpsilon:
    """``single``: ε_train for every epoch."""

    def value(self, t: float, total: int, target: float) -> float:
        return target


@dataclass(frozen=True)
class LinearEpsilon:
    """``x,y,e``: ε = x + (y − x)·t/e while t ≤ e, then ε_train."""

    start: float
    end: float
    epochs: float

    def value(self, t: float, total: int, target: float) -> float:
        if t > self.epochs:
            return target
        v = self.start + (self.end - self.start) * t / self.epochs
        return max(v, _EPS_FLOOR * target)


@dataclass(frozen=True)
class LogEpsilon:
    """``log``: from 0 to ε_train at a logarithmic rate, reaching it at half the epochs.

    ε(τ) = ε_train · ln(1 + (e − 1)·τ) with τ = t / (total / 2) ∈ [0, 1].
    """

    def value(self, t: float, total: int, target: float) -> float:
        tau = min(t / max(total / 2, 1e-12), 1.0)
        return max(target * math.log1p((math.e - 1) * tau), _EPS_FLOOR * target)


@dataclass(frozen=True)
class ConstantLambda:
    """``x``: λ = x throughout."""

    lam: float

    def value(self, t: float, total: int) -> float:
        return self.lam


@dataclass(frozen=True)
class LinearLambda:
    """``x,y,e``: λ = x + (y − x)·t/e while t < e, then y."""

    start: float
    end: float
    epochs: float

    def value(self, t: float, total: int) -> float:
        if t >= self.epochs:
            return self.end
        return self.start + (self.end - self.start) * t / self.epochs


@dataclass(frozen=True)
class ConstantLR:
    """``constant``: the initial rate throughout."""

    def value(self, t: float, total: int, init_lr: float) -> float:
        return init_lr


@dataclass(frozen=True)
class DecayToLR:
    """``decay_to_X``: constant until ``start`` (a fraction of the epochs), then decays
    exponentially to X at the last epoch.

    The paper's text starts the decay at half the epochs (``start=0.5``, the default); the
    authors' code names that ``decay_to_X_after_half`` and decays from epoch 0 in its
    ``decay_to_X`` (``start=0``).
    """

    final: float
    start: float = 0.5

    def value(self, t: float, total: int, init_lr: float) -> float:
        t0 = total * self.start
        if t <= t0 or total <= 0:
            return init_lr
        frac = min((t - t0) / (total - t0), 1.0)
        return init_lr * (self.final / init_lr) ** frac


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TRIPLE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*$")


def _triple(text: str) -> tuple[float, float, float] | None:
    m = _TRIPLE.match(text)
    return tuple(float(g) for g in m.groups()) if m else None  # type: ignore[return-value]


def parse_epsilon_schedule(text: str) -> SingleEpsilon | LinearEpsilon | LogEpsilon:
    """Parses ``single``, ``log`` or ``x,y,e``."""
    named = {"single": SingleEpsilon(), "log": LogEpsilon()}
    if text.strip() in named:
        return named[text.strip()]
    triple = _triple(text)
    if triple is None or triple[2] <= 0:
        raise ConfigError(
            f"Bad epsilon schedule {text!r}: use 'single', 'log', or 'x,y,e' (e > 0)."
        )
    return LinearEpsilon(*triple)


def parse_lambda_schedule(text: str | float) -> ConstantLambda | LinearLambda:
    """Parses ``x`` or ``x,y,e``."""
    text = str(text)
    triple = _triple(text)
    if triple is not None:
        if triple[2] <= 0:
            raise ConfigError(f"Bad lambda schedule {text!r}: e must be > 0.")
        _check_lambda(text, triple[:2])
        return LinearLambda(*triple)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"Bad lambda schedule {text!r}: use 'x' or 'x,y,e'.") from None
    _check_lambda(text, (value,))
    return ConstantLambda(value)


def _check_lambda(text: str, values) -> None:
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(
            f"Bad lambda schedule {text!r}: λ weighs the robust term and must be finite and "
            f">= 0 (the paper uses 1 to 3 for MNIST)."
        )


def parse_lr_schedule(text: str, decay_start: float = 0.5) -> ConstantLR | DecayToLR:
    """Parses ``constant`` or ``decay_to_X`` (e.g. ``decay_to_1e-6``), the decay starting at
    ``decay_start`` of the epochs."""
    if text.strip() == "constant":
        return ConstantLR()
    m = re.match(rf"^decay_to_({_NUM})$", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f"Bad LR schedule {text!r}: use 'constant', 'cosine' or 'decay_to_X' (X > 0)."
        )
    return DecayToLR(float(m.group(1)), decay_start)


def scale_schedule(text: str | float, factor: float) -> str:
    """An ε or λ schedule string with its ramp length (``e`` of ``x,y,e``) times ``factor``.

    Named schedules (``single``, ``log``) and constants are already relative to the run's
    length and come back unchanged. Used by ``gloro train --epochs N`` to shorten or lengthen
    a recipe as a whole.
    """
    text = str(text)
    m = _TRIPLE.match(text)
    if m is None:
        return text
    x, y, e = m.groups()
    return f"{x},{y},{float(e) * factor:.6g}"
