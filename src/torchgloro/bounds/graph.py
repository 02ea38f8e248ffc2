"""The Lipschitz bound of a traced graph: composition multiplies, adds add, concatenations
add in squares.

:func:`~torchgloro.bounds.plan.plan_graph` turns a GraphModule into steps and their layer
bounds; :class:`GraphBound` composes them, as one :class:`LayerBound` for everything
before the head, in the three ways a :class:`GloroNet` needs: the differentiable
power-iteration estimate (training), the proven bound (certification) and the float64
round-off model (:mod:`torchgloro.bounds.roundoff`). For a value v = Σ_k g_k(u_k) of
branches, ‖v(x) − v(x')‖ ≤ Σ_k L_k‖x − x'‖; for v = cat(u_1, ..., u_m),
‖v(x) − v(x')‖² = Σ_k ‖u_k(x) − u_k(x')‖² ≤ (Σ_k L_k²)‖x − x'‖².
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from torchgloro.bounds import roundoff
from torchgloro.bounds.plan import Make, plan_graph
from torchgloro.bounds.registry import ConstantBound, LayerBound
from torchgloro.bounds.weight_cache import WeightsGeneration
from torchgloro.margins import UNDERFLOW_F32, UNDERFLOW_F64, UNIT_ROUNDOFF_F64, round_up

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
        steps, bounds, out = plan_graph(gm, tuple(in_shape), make)
        self.steps = tuple(steps)
        self.out = out
        self.nodes = nn.ModuleList(bounds)
        self._weights = WeightsGeneration()
        self._cache: dict = {}

    def _compose(self, layer_value, add, cat, one):
        """Runs the steps on per-value bounds with the given combinators; ``layer_value``
        gets the value and the index of the layer's bound."""
        values = [one]
        for s in self.steps:
            ins = [values[i] for i in s.inputs]
            if s.kind == "layer":
                values.append(layer_value(ins[0], s.bound))
            elif s.kind == "add":
                values.append(add(ins))
            else:
                values.append(cat(ins))
        return values[self.out]

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        def layer(v, i):
            b = self.nodes[i]
            if isinstance(b, ConstantBound) and b.value == 1.0:
                return v  # reshapes, ReLU, ...: skip the op (and its grad)
            e = b.estimate(n_iter=n_iter, differentiable=differentiable)
            return e if v is None else v * e

        def fill(v):
            return v if v is not None else torch.ones(())

        k = self._compose(
            layer,
            lambda vs: sum(fill(v) for v in vs),
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
            lambda v, i: _times_up(v, norms[i]),
            lambda vs: round_up(sum(vs), len(vs) + 1),
            lambda vs: round_up(math.sqrt(round_up(sum(v * v for v in vs), len(vs) + 2)), 2),
            1.0,
        )

    def _roundoff(self, unit_roundoff: float) -> roundoff.ValueBounds:
        low = UNDERFLOW_F64 if unit_roundoff == UNIT_ROUNDOFF_F64 else UNDERFLOW_F32
        norms, terms, peaks = self._proofs(unit_roundoff)
        return self._compose(
            lambda v, i: roundoff.through_layer(
                v, norms[i], terms[i], lambda u, p=peaks[i]: p, unit_roundoff, low
            ),
            lambda vs: roundoff.added(vs, unit_roundoff),
            roundoff.concatenated,
            roundoff.graph_input(),
        )

    def fp_terms(self) -> tuple[int, float, float]:
        return roundoff.as_layer_terms(self._roundoff(UNIT_ROUNDOFF_F64), UNIT_ROUNDOFF_F64)

    def peak_terms(self, unit_roundoff: float) -> tuple[float, float]:
        return self._roundoff(unit_roundoff).peak

    def extra_repr(self) -> str:
        kinds = [s.kind for s in self.steps]
        return f"{len(kinds)} steps: {kinds.count('add')} adds, {kinds.count('cat')} cats"
