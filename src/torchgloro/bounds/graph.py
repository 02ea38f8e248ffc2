"""The Lipschitz bound of a traced graph: composition multiplies, adds add, concatenations
add in squares.

:func:`~torchgloro.bounds.plan.plan_graph` turns a GraphModule into steps and their layer
bounds; :class:`GraphBound` composes them, as one :class:`LayerBound` for everything
before the head, in the three ways a :class:`GloroNet` needs: the differentiable
power-iteration estimate (training), the proven bound (certification) and the float64
round-off models (:mod:`torchgloro.bounds.roundoff`: float64's a priori, float32's a priori
and from the norms a float32 pass measured). For a value v = Σ_k g_k(u_k) of
branches, ‖v(x) − v(x')‖ ≤ Σ_k L_k‖x − x'‖; for v = cat(u_1, ..., u_m),
‖v(x) − v(x')‖² = Σ_k ‖u_k(x) − u_k(x')‖² ≤ (Σ_k L_k²)‖x − x'‖².
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from torchgloro.bounds import roundoff
from torchgloro.bounds.generation import WeightsGeneration
from torchgloro.bounds.plan import Make, plan_graph
from torchgloro.bounds.registry import ConstantBound, LayerBound
from torchgloro.margins import (
    UNDERFLOW_F32,
    UNDERFLOW_F64,
    UNIT_ROUNDOFF_F32,
    UNIT_ROUNDOFF_F64,
    gamma,
    round_up,
)

__all__ = ["GraphBound"]


def _layer_tensors(bounds) -> list[torch.Tensor] | None:
    """The tensors of every bound's layer (what its proofs read), or None when a bound
    other than a constant does not name its layer (then nothing is cached)."""
    out: list[torch.Tensor] = []
    for b in bounds:
        layer = getattr(b, "layer", None)
        if layer is None and isinstance(getattr(b, "inner", None), LayerBound):
            layer = getattr(b.inner, "layer", None)  # a parametrized layer's bound
        if layer is None:
            if not isinstance(b, ConstantBound):
                return None
            continue
        out += [*layer.parameters(), *layer.buffers()]
    return out


def _times_up(a: float, b: float) -> float:
    """``a·b`` rounded up, as :func:`torchgloro.margins.product_upper` does per factor (a
    traced chain gets the very bound of the same ``nn.Sequential``)."""
    if not (b >= 0 and math.isfinite(b)):
        raise ValueError(f"a layer bound must be finite and >= 0, got {b}")
    return 0.0 if (a == 0.0 or b == 0.0) else math.nextafter(a * b, math.inf)


class GraphBound(LayerBound):
    """Everything a traced graph computes before its head, as one bound.

    Args:
        gm: The traced model.
        in_shape: Its per-sample input shape.
        make: Builds a module's bound (``(module, in_shape) -> LayerBound``).
    """

    fp_terms_precision_free = False  # the model folds float64's unit round-off in

    def __init__(self, gm: fx.GraphModule, in_shape: tuple[int, ...], make: Make) -> None:
        super().__init__()
        steps, bounds, out, names = plan_graph(gm, tuple(in_shape), make)
        self.steps = tuple(steps)
        self.out = out
        self.value_names = tuple(names)  # the graph node computing each value (0: the input)
        self.nodes = nn.ModuleList(bounds)
        self._weights = WeightsGeneration()
        self._cache: dict = {}

    def _compose(self, layer_value, add, cat, one):
        """Runs the steps on per-value bounds with the given combinators: ``layer_value``
        gets the input's bound, the index of the layer's bound and the input's value index;
        ``add`` the inputs' bounds and the sum's value index; ``cat`` the parts' bounds."""
        values = [one]
        for s in self.steps:
            ins = [values[i] for i in s.inputs]
            if s.kind == "layer":
                values.append(layer_value(ins[0], s.bound, s.inputs[0]))
            elif s.kind == "add":
                values.append(add(ins, len(values)))
            else:
                values.append(cat(ins))
        return values[self.out]

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        def layer(v, i, _):
            b = self.nodes[i]
            if isinstance(b, ConstantBound) and b.value == 1.0:
                return v  # reshapes, ReLU, ...: skip the op (and its grad)
            e = b.estimate(n_iter=n_iter, differentiable=differentiable)
            return e if v is None else v * e

        def fill(v):
            return v if v is not None else torch.ones(())

        k = self._compose(
            layer,
            lambda vs, _: sum(fill(v) for v in vs),
            lambda vs: torch.sqrt(sum(fill(v) ** 2 for v in vs)),
            None,
        )
        return fill(k)

    def iterate(self, n_iter: int) -> None:
        for b in self.nodes:
            b.iterate(n_iter)

    @torch.no_grad()
    def converge(self, tol: float = 1e-5, max_iter: int = 1_000) -> torch.Tensor:
        for b in self.nodes:
            b.converge(tol=tol, max_iter=max_iter)
        return self.estimate()

    def _proofs(self, unit_roundoff: float) -> tuple[list, list, list]:
        """Every node's ``sound()``, ``fp_terms()`` and ``peak_terms(u)``, computed once per
        value of the layers' tensors (a certification reads them several times)."""
        tensors = _layer_tensors(self.nodes)
        generation = None if tensors is None else self._weights.update(tensors)
        if generation is None or self._cache.get("generation") != generation:
            self._cache = {"generation": generation}
        if unit_roundoff not in self._cache:
            self._cache[unit_roundoff] = (
                [b.sound() for b in self.nodes],
                [b.fp_terms() for b in self.nodes],
                [b.peak_terms(unit_roundoff) for b in self.nodes],
            )
        return self._cache[unit_roundoff]

    def sound(self) -> float:
        norms = self._proofs(UNIT_ROUNDOFF_F64)[0]
        return self._compose(
            lambda v, i, _: _times_up(v, norms[i]),
            lambda vs, _: round_up(sum(vs), len(vs) + 1),
            lambda vs: round_up(math.sqrt(round_up(sum(v * v for v in vs), len(vs) + 2)), 2),
            1.0,
        )

    def roundoff(self, unit_roundoff: float) -> roundoff.ValueBounds:
        """A priori bounds (norm, error, peak) on the head's input, evaluated at
        ``unit_roundoff`` (float64's or float32's)."""
        low = UNDERFLOW_F64 if unit_roundoff == UNIT_ROUNDOFF_F64 else UNDERFLOW_F32
        norms, terms, peaks = self._proofs(unit_roundoff)
        return self._compose(
            lambda v, i, _: roundoff.through_layer(
                v, norms[i], terms[i], lambda u, p=peaks[i]: p, unit_roundoff, low
            ),
            lambda vs, _: roundoff.added(vs, unit_roundoff),
            roundoff.concatenated,
            roundoff.graph_input(),
        )

    def fp_terms(self) -> tuple[int, float, float]:
        return roundoff.as_layer_terms(self.roundoff(UNIT_ROUNDOFF_F64), UNIT_ROUNDOFF_F64)

    def peak_terms(self, unit_roundoff: float) -> tuple[float, float]:
        return self.roundoff(unit_roundoff).peak

    def float32_applies(self) -> bool:
        """Whether every node's round-off model holds in float32 too (``fp_terms`` free of
        float64's unit round-off, dot products short enough for float32's γ_n)."""
        if not all(b.fp_terms_precision_free for b in self.nodes):
            return False
        terms = self._proofs(UNIT_ROUNDOFF_F32)[1]
        return all(t is None or gamma(t[0], UNIT_ROUNDOFF_F32) < 1 for t in terms)

    def _own_roundoff(self, unit_roundoff: float) -> list[tuple[float, float]]:
        """Each node's ``(p, q)`` of :func:`roundoff.layer_roundoff` (cached per weights)."""
        norms, terms, _ = self._proofs(unit_roundoff)  # (resets the cache on new weights)
        key = ("own", unit_roundoff)
        if key not in self._cache:
            low = UNDERFLOW_F64 if unit_roundoff == UNIT_ROUNDOFF_F64 else UNDERFLOW_F32
            own = [roundoff.layer_roundoff(L, t, unit_roundoff, low) for L, t in zip(norms, terms)]
            self._cache[key] = own
        return self._cache[key]

    def measured_values(self, unit_roundoff: float) -> dict[str, int]:
        """The values whose computed norms :meth:`measured_error` reads, by graph node name:
        the inputs of the layers that round, the sums, and the head's input."""
        own = self._own_roundoff(unit_roundoff)
        want = {self.out}
        for k, s in enumerate(self.steps, start=1):
            if s.kind == "add":
                want.add(k)
            elif s.kind == "layer" and own[s.bound] != (0.0, 0.0):
                want.add(s.inputs[0])
        return {self.value_names[k]: k for k in want if k != 0}

    def measured_error(
        self, norms: dict[int, torch.Tensor], x_norm: torch.Tensor, unit_roundoff: float
    ) -> torch.Tensor:
        """(n,) proven ‖h̃ − h‖₂ of the head's input, a posteriori.

        Args:
            norms: Upper bounds on the norms of the computed values of
                :meth:`measured_values`, by value index, ``(n,)`` each.
            x_norm: ``(n,)`` upper bounds on the inputs' norms (the input is exact).
            unit_roundoff: That of the pass the norms were measured on.
        """
        sound_norms = self._proofs(unit_roundoff)[0]
        own = self._own_roundoff(unit_roundoff)
        norms = {**norms, 0: x_norm}

        def layer(e, i, src):
            n = norms[src] if own[i] != (0.0, 0.0) else None
            return roundoff.measured_layer(e, n, sound_norms[i], own[i])

        err = self._compose(
            layer,
            lambda es, k: roundoff.measured_add(es, norms[k], unit_roundoff),
            roundoff.measured_cat,
            torch.zeros_like(x_norm),
        )
        # float64 sums and products of non-negative terms, a few per step: a relative
        # 3·steps·2^-53 at most, which 1e-9 covers for any graph of under 10^6 steps.
        return err * (1 + 1e-9)

    def extra_repr(self) -> str:
        kinds = [s.kind for s in self.steps]
        return f"{len(kinds)} steps: {kinds.count('add')} adds, {kinds.count('cat')} cats"
