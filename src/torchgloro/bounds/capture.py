"""From a user's model to what a GloroNet runs and bounds: the Sequential fast path or a
traced graph, the logits' head, and the per-sample input shape when the model states it.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from torchgloro._errors import GloroInputError, InputShapeError, UnsupportedLayerError
from torchgloro._net_attributes import eval_mode
from torchgloro.bounds.graph import GraphBound
from torchgloro.bounds.plan import head_node
from torchgloro.bounds.registry import (
    _REGISTRY,
    LayerBound,
    bound_for,
    flatten_layers,
    trace_input_shapes,
)
from torchgloro.bounds.trace import trace

__all__ = ["capture", "build_bounds", "resolve_in_shape", "PendingBound", "make_bound"]


def make_bound(module: nn.Module, in_shape: tuple[int, ...]) -> LayerBound:
    """``bound_for``, plus modules under ``torch.nn.utils.parametrize`` (orthogonal,
    spectral_norm, ...): the base type's bound on the parametrized weight. A bound
    registered outside torchgloro has its round-off claim checked (:func:`check_exact_claim`).
    """
    if parametrize.is_parametrized(module) and type(module).__bases__[0] in _REGISTRY:
        return ParametrizedBound(_REGISTRY[type(module).__bases__[0]](module, in_shape))
    bound = bound_for(module, in_shape)
    if not _REGISTRY[type(module)].__module__.startswith("torchgloro."):
        check_exact_claim(module, bound, in_shape)
    return bound


@torch.no_grad()
def check_exact_claim(module: nn.Module, bound: LayerBound, in_shape: tuple[int, ...]) -> None:
    """Refuses a bound whose ``fp_terms()`` is None (exact arithmetic) for a layer that rounds.

    An exact layer (a selection, max, sign flip, zero padding) outputs entries of its input
    or 0, so on float32 inputs its float32 and float64 outputs are equal; a layer that
    rounds gives different ones.

    Raises:
        UnsupportedLayerError: the claim fails, or ``fp_terms`` is not implemented.
    """
    name = type(module).__name__
    try:
        terms = bound.fp_terms()
    except NotImplementedError:
        raise UnsupportedLayerError(
            f"The bound registered for {name} does not implement fp_terms(), which sound "
            f"certification needs: return None if {name} computes exactly, else (n, ‖|A|‖₂, "
            f"‖b‖₂) (docs/bounds.md, 'Your own layer')."
        ) from None
    if terms is not None:
        return
    x = torch.randn((4, *in_shape), generator=torch.Generator().manual_seed(0)) * 3
    m64 = copy.deepcopy(module).double()
    with eval_mode(module), eval_mode(m64):
        y32, y64 = module(x.to(next(module.parameters(), x))), m64(x.double())
    if not torch.equal(y32.double().cpu(), y64.cpu()):
        raise UnsupportedLayerError(
            f"The bound registered for {name} claims exact arithmetic (fp_terms() returns "
            f"None), but {name} rounds: its float32 and float64 outputs differ. Return its "
            f"round-off terms (n, ‖|A|‖₂, ‖b‖₂) from fp_terms() (docs/bounds.md)."
        )


class ParametrizedBound(LayerBound):
    """The base layer's bound, with the proofs read in eval mode (a spectral_norm
    parametrization advances its own power iteration on every weight read in training)."""

    def __init__(self, inner: LayerBound) -> None:
        super().__init__()
        self.inner = inner
        self.fp_terms_precision_free = inner.fp_terms_precision_free

    def estimate(self, n_iter: int = 0, differentiable: bool = False):
        return self.inner.estimate(n_iter, differentiable)

    def iterate(self, n_iter: int) -> None:
        self.inner.iterate(n_iter)

    def converge(self, tol: float = 1e-5, max_iter: int = 1_000):
        return self.inner.converge(tol, max_iter)

    def sound(self) -> float:
        with eval_mode(self.inner.layer):
            return self.inner.sound()

    def fp_terms(self):
        with eval_mode(self.inner.layer):
            return self.inner.fp_terms()

    def peak_terms(self, unit_roundoff: float):
        with eval_mode(self.inner.layer):
            return self.inner.peak_terms(unit_roundoff)


def capture(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(what runs, the logits' head)``: an ``nn.Sequential`` of bounded layers as it is
    (the fast path), any other model as its traced ``torch.fx.GraphModule``."""
    try:
        layers = flatten_layers(backbone)
    except UnsupportedLayerError:
        layers = None
    if layers is not None:
        if not layers:
            raise UnsupportedLayerError(
                "The backbone has no layers; it must end in nn.Linear (the class logits)."
            )
        head = layers[-1]
        if type(head) is not nn.Linear and not hasattr(head, "effective_weight"):
            raise UnsupportedLayerError(
                f"The backbone's last layer must be nn.Linear (the class logits), got "
                f"{head.__class__.__name__}; end the backbone with an nn.Linear layer."
            )
        return backbone, head
    gm = trace(backbone)
    return gm, gm.get_submodule(head_node(gm).target)


def resolve_in_shape(
    in_shape: tuple[int, ...] | int | None,
    example_input: torch.Tensor | None,
    model: nn.Module,
    runs: nn.Module,
) -> tuple[int, ...] | None:
    """The per-sample input shape from the arguments or the model, or None if not yet known.

    Args:
        in_shape: As passed (an int for 1-D inputs).
        example_input: A batch ``(B, *in_shape)``, or None.
        model: The user's model; ``runs``: what :func:`capture` made of it.
    """
    if in_shape is None and example_input is not None:
        in_shape = tuple(example_input.shape[1:])
    if in_shape is None:
        in_shape = _known_in_shape(model, runs)
    if in_shape is None:
        return None
    shape = (in_shape,) if isinstance(in_shape, int) else in_shape
    try:
        shape = tuple(shape)
        ok = all(int(s) == s and s > 0 for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GloroInputError(
            f"in_shape must be the per-sample input shape, a tuple of positive ints such as "
            f"(1, 28, 28), or an int for 1-D inputs; got {in_shape!r}."
        )
    return tuple(int(s) for s in shape)


def _known_in_shape(backbone: nn.Module, runs: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape when the model states it: a ``create_model`` backbone's
    ``in_shape``, or the ``in_features`` of an ``nn.Linear`` that takes the input."""
    if getattr(backbone, "in_shape", None) is not None:
        return tuple(backbone.in_shape)
    if isinstance(runs, fx.GraphModule):
        users = list(next(iter(runs.graph.nodes)).users)
        mod = runs.get_submodule(users[0].target) if len(users) == 1 and (
            users[0].op == "call_module") else None  # fmt: skip
    else:
        mod = flatten_layers(runs)[0]
    known = isinstance(mod, nn.Linear) and mod.in_features > 0  # (not a LazyLinear)
    return (mod.in_features,) if known else None  # (parametrized too)


def build_bounds(backbone: nn.Module, in_shape: tuple[int, ...]) -> list[LayerBound]:
    """The bounds of everything before the head, for inputs of shape ``in_shape``."""
    if isinstance(backbone, fx.GraphModule):
        try:
            return [GraphBound(backbone, in_shape, make_bound)]
        except RuntimeError as e:  # UnsupportedLayerError is a TypeError: it passes
            raise _shape_error(in_shape, e) from None
    layers = flatten_layers(backbone)
    try:
        shapes = trace_input_shapes(layers, in_shape)
    except RuntimeError as e:  # shapes that do not chain (UnsupportedLayerError passes)
        raise _shape_error(in_shape, e) from None
    if len(shapes[-1]) != 1:
        raise UnsupportedLayerError(
            f"The last nn.Linear gets inputs of shape {shapes[-1]} per sample; it must get "
            f"flat features to give one row of class logits per input. Put nn.Flatten() "
            f"before it."
        )
    return [make_bound(m, s) for m, s in zip(layers[:-1], shapes[:-1])]


def _shape_error(in_shape: tuple[int, ...], e: Exception) -> InputShapeError:
    return InputShapeError(
        f"The backbone cannot run on inputs of shape in_shape={tuple(in_shape)} (per sample, "
        f"without the batch dimension): {e}. Pass the in_shape the backbone was built for."
    )


class PendingBound(LayerBound):
    """Stands in for the bounds until the input shape is known: every use says so."""

    def _refuse(self, *args, **kwargs):
        raise InputShapeError(
            "This GloroNet does not know its input shape yet, so its layers' bounds are not "
            "built. Call it once on a batch (net(x)), or construct it with in_shape=(C, H, W) "
            "or example_input=x."
        )

    estimate = iterate = converge = sound = fp_terms = peak_terms = _refuse
