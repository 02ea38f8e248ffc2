"""Graph capture: a model's forward as a ``torch.fx`` graph, with errors that point at code.

``torch.fx`` symbolic tracing (not ``torch.export``): it keeps every layer with a registered
bound as one ``call_module`` node (a Conv2d stays a Conv2d whose bound runs power iteration
on its own weight), works on the model as written without example inputs or shape guards,
and refuses data-dependent control flow at trace time. The traced ``GraphModule`` (sharing
the model's parameters) is what a :class:`~torchgloro.GloroNet` then runs, so the function
that is certified is exactly the graph that was bounded.
"""

from __future__ import annotations

import operator
import traceback

from torch import fx, nn
from torch.nn.utils import parametrize

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds.registry import _REGISTRY

__all__ = ["trace", "node_location", "has_bound", "writes_in_place", "AUGMENTED"]


def has_bound(module: nn.Module) -> bool:
    """Whether a bound is registered for ``module``'s type (or, parametrized, its base type)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls in _REGISTRY


# ``h += y`` and co. as traced (:class:`_Proxy`): in place on tensors, plain on numbers.
AUGMENTED = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})


def writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` overwrites its input: an ``inplace=True`` module or argument, a
    trailing-underscore method or function (``h.add_(y)``, ``torch.relu_(h)``), or ``h += y``."""
    t = node.target
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(t), "inplace", False))
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("_")
    return in_place or t in AUGMENTED or bool(node.kwargs.get("inplace", False))


def _augmented(op):
    """``h op= y`` as Python runs it (``operator.iadd``: in place on a tensor)."""

    def method(self: fx.Proxy, other: object) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


class _Proxy(fx.Proxy):
    """A proxy whose augmented assignments stay augmented. ``fx.Proxy`` has no ``__iadd__``,
    so ``g += y`` became ``g = g + y``: where ``g`` aliases ``h``, the graph then left ``h``
    unchanged while the model changes it, and the net certified another function."""

    __iadd__ = _augmented(operator.iadd)
    __isub__ = _augmented(operator.isub)
    __imul__ = _augmented(operator.imul)
    __itruediv__ = _augmented(operator.itruediv)


class _Tracer(fx.Tracer):
    """Stops at every module with a registered bound; records where each node comes from;
    keeps ``+=``, ``-=``, ``*=``, ``/=`` in place (:class:`_Proxy`)."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_bound(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model``'s forward as a GraphModule that shares its parameters.

    Raises:
        UnsupportedLayerError: the forward cannot be traced (data-dependent control flow,
            a call that needs concrete values), naming the line of the model's code.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one clear error
        where = _user_frame(e)
        raise UnsupportedLayerError(
            f"Cannot trace the forward of {type(model).__name__}{where}: {e}. A GloroNet "
            f"bounds a static graph: control flow that depends on the input's values (an "
            f"`if` on a tensor, a loop over its entries) has no global Lipschitz bound. Make "
            f"the forward the same computation for every input, or move that branch out."
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _user_frame(e: BaseException) -> str:
    """`` at file:line (`code`)`` for the innermost frame outside torch, or ``""``."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    frames = [f for f in frames if "/torchgloro/bounds/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} (`{(f.line or '').strip()}`)"


def node_location(node: fx.Node) -> str:
    """`` at file:line (`code`)``: where ``node`` comes from in the user's code, or ``""``."""
    lines = (node.stack_trace or "").strip().splitlines()
    frames = [
        (lines[i].strip()[5:], lines[i + 1].strip() if i + 1 < len(lines) else "")
        for i in range(len(lines))
        if lines[i].strip().startswith("File ")
        and "/torch/" not in lines[i]
        and "/torchgloro/bounds/" not in lines[i]
    ]
    if not frames:
        return ""
    where, code = frames[-1]
    return f" at {where}" + (f" (`{code}`)" if code else "")
