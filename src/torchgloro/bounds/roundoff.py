"""Float round-off through a graph: the per-layer model of docs/soundness.md §7, on a DAG.

Every value ``h`` of a graph gets three affine bounds in the input norm ``‖x‖₂`` (each a
``(coefficient, constant)`` pair): ``norm`` (‖h‖ ≤ ...), ``err`` (‖h̃ − h‖ ≤ ... for the
computed h̃) and ``peak`` (every value computed on the way to h̃ is at most ... in absolute
value, the overflow guard). A layer applies the chain model of
:func:`torchgloro.margins.forward_error_coefficients` to its computed input; an add
``a + b`` adds one rounding, ``|fl(ã + b̃) − (ã + b̃)| ≤ u·|ã + b̃|`` componentwise; a
concatenation is exact and its bounds are root sums of squares (Minkowski's inequality keeps
them affine).

The same rules run a posteriori on the values a float32 pass computed
(:func:`measured_layer`, :func:`measured_add`, :func:`measured_cat`): the norm of each
computed value is measured instead of bounded in ‖x‖, which is about twice as tight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torchgloro.margins import (
    forward_error_coefficients,
    peak_magnitude_coefficients,
    round_up,
)

__all__ = [
    "ValueBounds",
    "graph_input",
    "layer_roundoff",
    "through_layer",
    "added",
    "concatenated",
    "as_layer_terms",
    "measured_layer",
    "measured_add",
    "measured_cat",
]

Affine = tuple[float, float]  # c·‖x‖₂ + d


def _sum(*terms: Affine) -> Affine:
    return round_up(sum(t[0] for t in terms), 4), round_up(sum(t[1] for t in terms), 4)


def _scale(s: float, t: Affine) -> Affine:
    return round_up(s * t[0], 2), round_up(s * t[1], 2)


def _max(*terms: Affine) -> Affine:
    return max(t[0] for t in terms), max(t[1] for t in terms)


@dataclass(frozen=True)
class ValueBounds:
    """Bounds on one value of the graph, affine in the input norm ‖x‖₂."""

    norm: Affine  # ‖h‖₂ of the exact value
    err: Affine  # ‖h̃ − h‖₂, h̃ the computed value
    peak: Affine  # every value computed so far, in absolute value

    @property
    def computed(self) -> Affine:
        """A bound on ‖h̃‖₂ (norm + err)."""
        return _sum(self.norm, self.err)


def graph_input() -> ValueBounds:
    """The input x itself: exact, of norm ‖x‖."""
    return ValueBounds((1.0, 0.0), (0.0, 0.0), (1.0, 0.0))


def layer_roundoff(
    lipschitz: float, terms: tuple[int, float, float] | None, unit_roundoff: float, underflow: float
) -> Affine:
    """``(p, q)`` with ‖fl(f(h̃)) − f(h̃)‖₂ ≤ p‖h̃‖₂ + q: a layer's own round-off on its computed
    input h̃ (the chain model of one layer; ``(0, 0)`` for an exact layer)."""
    return forward_error_coefficients([(lipschitz, terms)], unit_roundoff, underflow)


def through_layer(
    h: ValueBounds,
    lipschitz: float,
    terms: tuple[int, float, float] | None,
    peak: Callable[[float], tuple[float, float] | None] | None,
    unit_roundoff: float,
    underflow: float,
) -> ValueBounds:
    """``f(h)`` for a layer with proven bound ``lipschitz`` and round-off ``terms``.

    The chain model applied to the computed input h̃ gives ‖fl(f(h̃)) − f(h̃)‖ ≤ p‖h̃‖ + q,
    and ‖f(h̃) − f(h)‖ ≤ L‖h̃ − h‖, so err' ≤ L·err + p·(norm + err) + q; the norm grows as
    L·norm + b with b ≥ ‖f(0)‖ the layer's bias term.
    """
    p, q = layer_roundoff(lipschitz, terms, unit_roundoff, underflow)
    a, c = peak_magnitude_coefficients([(lipschitz, terms, peak)], unit_roundoff, underflow)
    b = terms[2] if terms is not None else 0.0
    inp = h.computed
    norm = _sum(_scale(lipschitz, h.norm), (0.0, b))
    err = _sum(_scale(lipschitz, h.err), _scale(p, inp), (0.0, q))
    return ValueBounds(norm, err, _max(h.peak, _sum(_scale(a, inp), (0.0, c))))


def added(values: Sequence[ValueBounds], unit_roundoff: float) -> ValueBounds:
    """``a + b (+ ...)`` computed left to right: each add rounds once (≤ u·‖running sum‖)."""
    norm, err, peak = values[0].norm, values[0].err, values[0].peak
    for v in values[1:]:
        norm = _sum(norm, v.norm)
        err = _sum(err, v.err)
        err = _sum(err, _scale(unit_roundoff, _sum(norm, err)))
        peak = _max(peak, v.peak, _sum(norm, err))
    return ValueBounds(norm, err, peak)


def concatenated(values: Sequence[ValueBounds]) -> ValueBounds:
    """``cat(a, b, ...)``: exact; norms and errors add in squares."""

    def rss(ts: Sequence[Affine]) -> Affine:
        return tuple(  # type: ignore[return-value]
            round_up(math.sqrt(round_up(sum(t[i] ** 2 for t in ts), 4)), 4) for i in (0, 1)
        )

    return ValueBounds(
        rss([v.norm for v in values]),
        rss([v.err for v in values]),
        _max(*(v.peak for v in values)),
    )


def as_layer_terms(out: ValueBounds, unit_roundoff: float) -> tuple[int, float, float]:
    """``(1, A, b)`` that make the chain model of one layer cover a whole graph.

    With ``err ≤ p‖x‖ + q`` and ``norm ≤ L‖x‖ + B`` at the graph's output, the chain model's
    ``e' ≤ γ₁(A(N + e) + b) + L·e`` and ``N' ≤ L·N + b`` hold for ``A = p/γ₁`` and
    ``b = max(B, q/γ₁)`` (γ₁ = u/(1 − u)), as for
    :class:`torchgloro.bounds.nn_layers.ResidualBound`.
    """
    gamma1 = unit_roundoff / (1 - unit_roundoff)
    p, q = out.err
    return 1, round_up(p / gamma1 * 1.001, 4), round_up(max(out.norm[1], q / gamma1) * 1.001, 4)


def measured_layer(
    err: torch.Tensor, in_norm: torch.Tensor | None, lipschitz: float, own: Affine
) -> torch.Tensor:
    """(B,) error after a layer, given the error ``err`` of its computed input h̃ and an upper
    bound ``in_norm`` on ‖h̃‖ (None for an exact layer): ``L·err + p·‖h̃‖ + q``, with
    ``own = (p, q)`` from :func:`layer_roundoff`."""
    out = err * lipschitz
    return out if in_norm is None else out + (own[0] * in_norm + own[1])


def measured_add(
    errs: Sequence[torch.Tensor], out_norm: torch.Tensor, unit_roundoff: float
) -> torch.Tensor:
    """(B,) error of ``fl(ã + b̃)``, given an upper bound ``out_norm`` on the norm of the
    computed sum s̃: |s̃ − (ã + b̃)| ≤ u|ã + b̃| ≤ γ₁|s̃| componentwise (|s̃| ≥ (1 − u)|ã + b̃|),
    so the inputs' errors add, plus γ₁‖s̃‖."""
    return sum(errs[1:], errs[0]) + unit_roundoff / (1 - unit_roundoff) * out_norm


def measured_cat(errs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) error of a concatenation: exact, the parts' errors add in squares."""
    return torch.sqrt(sum((e * e for e in errs[1:]), errs[0] * errs[0]))
