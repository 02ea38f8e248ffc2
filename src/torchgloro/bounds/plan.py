"""Planning a traced graph: one :class:`~torchgloro.bounds.ops.Step` per node that the
data flows through, with the layer bounds of the ``layer`` steps.

The graph runs once on batches of 2 and 3 (eval mode) so that every node's per-sample
shape is known and checked to keep the batch dimension whole, and static values (sizes,
constants) are read and checked not to depend on the batch size.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from torchgloro._certify import eval_mode
from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds.ops import (
    ADDS,
    CATS,
    RESHAPES,
    SCALES,
    STATIC,
    Step,
    function_bound,
    refuse,
    scalar_bound,
)
from torchgloro.bounds.tensor_ops import TensorOperandBound, tensor_operand_ok
from torchgloro.lipschitz import ConstantBound, LayerBound

__all__ = ["plan_graph", "head_node", "Make"]

Make = Callable[[nn.Module, tuple[int, ...]], LayerBound]


def head_node(gm: fx.GraphModule) -> fx.Node:
    """The node giving the class logits: the graph must return an ``nn.Linear``'s output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    mod = gm.get_submodule(node.target) if getattr(node, "op", None) == "call_module" else None
    if mod is None or not (type(mod) is nn.Linear or hasattr(mod, "effective_weight")):
        raise UnsupportedLayerError(
            "The model's forward must return the output of an nn.Linear layer (the class "
            "logits: the margin bounds use its rows), got "
            f"{getattr(node, 'target', node)!r}. End the forward with `return self.fc(h)`."
        )
    if len(node.users) != 1:
        raise UnsupportedLayerError("The logits' nn.Linear output must only be returned.")
    return node


@torch.no_grad()
def _record(gm: fx.GraphModule, in_shape: tuple[int, ...], batch: int) -> dict[fx.Node, object]:
    """Every node's value on a random batch (eval mode, so BatchNorm statistics stay put)."""
    p = next(iter(gm.parameters()), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *in_shape), generator=gen)
    x = x.to(p) if p is not None else x
    values: dict[fx.Node, object] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            values[n] = out = super().run_node(n)
            return out

    with eval_mode(gm):
        _Recorder(gm).run(x)
    return values


def _per_sample(node: fx.Node, a: object, b: object) -> tuple[int, ...]:
    """The per-sample shape of a data node's value, checked on batches of 2 and 3."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise refuse(
            node,
            f"it returns a {type(a).__name__}, not a tensor",
            "Return one tensor per step (index tuples in the forward).",
        )
    if a.dim() == 0 or a.shape[0] != 2 or b.shape[0] != 3 or a.shape[1:] != b.shape[1:]:
        raise refuse(
            node,
            f"it does not keep one output per input along dimension 0 (batches "
            f"of 2 and 3 gave {tuple(a.shape)} and {tuple(b.shape)})",
            "Keep the batch dimension first and whole, e.g. x.view(x.size(0), -1).",
        )
    return tuple(a.shape[1:])


def plan_graph(
    gm: fx.GraphModule, in_shape: tuple[int, ...], make: Make
) -> tuple[list[Step], list[LayerBound], int]:
    """Steps and layer bounds of ``gm`` up to its head's input (whose value index is returned).

    Raises:
        UnsupportedLayerError: a node without a global bound, with its line in the code.
    """
    return _Planner(gm, tuple(in_shape), make).run()


class _Planner:
    """Walks a graph once, node by node, recording each data node's step."""

    def __init__(self, gm: fx.GraphModule, in_shape: tuple[int, ...], make: Make) -> None:
        self.gm, self.in_shape, self.make = gm, in_shape, make
        self.va, self.vb = _record(gm, in_shape, 2), _record(gm, in_shape, 3)
        self.index: dict[fx.Node, int] = {}  # data node -> value index
        self.shapes: dict[int, tuple[int, ...]] = {}  # value index -> per-sample shape
        self.steps: list[Step] = []
        self.bounds: list[LayerBound] = []

    def run(self) -> tuple[list[Step], list[LayerBound], int]:
        head = head_node(self.gm)
        for node in self.gm.graph.nodes:
            if node is head:
                break
            if node.op == "placeholder":
                if self.index:
                    raise refuse(node, "the forward takes a second input", "Take one tensor x.")
                self.index[node], self.shapes[0] = 0, self.in_shape
                continue
            data = [a for a in node.all_input_nodes if a in self.index]
            if node.op in ("get_attr", "output") or not data or _is_static(node):
                continue
            _check_in_place(self.gm, node)
            out_shape = _per_sample(node, self.va[node], self.vb[node])
            step = self.dispatch(node, data, out_shape)
            if step is not None:
                self.steps.append(step)
            self.index[node] = len(self.steps)
            self.shapes[len(self.steps)] = out_shape
        src = head.args[0]
        if src not in self.index or len(self.shapes[self.index[src]]) != 1:
            raise UnsupportedLayerError(
                f"The logits' nn.Linear must get flat per-sample features computed from the "
                f"input, got shape {self.shapes.get(self.index.get(src, -1))}. Flatten before "
                f"it (torch.flatten(h, 1))."
            )
        return self.steps, self.bounds, self.index[src]

    def const(self, a: object) -> object:
        """A static argument's value, which must be the same for any batch."""
        if isinstance(a, fx.Node):
            if not _same(self.va[a], self.vb[a]):
                raise refuse(
                    a,
                    "its value depends on the batch size, so a bound built from "
                    "it would not hold per input",
                    "Use constants, or sizes of per-sample dimensions (x.size(1), not x.size(0)).",
                )
            return self.va[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(x) for x in a)
        return a

    def tensor_operand(self, node: fx.Node, attr: fx.Node, shape, out_shape) -> LayerBound:
        """The bound of ``x * t``, ``x / t``, ``x ± t`` or ``t ± x`` for a tensor ``t`` of the
        model (a parameter, buffer or constant)."""
        path, _, name = attr.target.rpartition(".")
        owner = self.gm.get_submodule(path)
        tensor = getattr(owner, name)
        t = node.target
        if not tensor_operand_ok(tensor, shape) or out_shape != shape:
            raise refuse(
                node,
                f"a tensor of shape {tuple(tensor.shape)} broadcasts across the batch or "
                f"enlarges the data (per-sample shape {shape})",
                "Give it a shape that broadcasts within one sample, e.g. (C, 1, 1).",
            )
        if t in SCALES and t not in (operator.mul, torch.mul, "mul"):
            if node.args[0] is attr:
                raise refuse(
                    node,
                    "dividing by a data-dependent value has no global Lipschitz bound",
                    "Divide by the model's tensor, not by the data.",
                )
            return TensorOperandBound("div", owner, name, shape)
        return TensorOperandBound("mul" if t in SCALES else "add", owner, name, shape)

    def layer(self, src: fx.Node, b: LayerBound) -> None:
        """Appends a layer step on the data node ``src``."""
        self.steps.append(Step("layer", (self.index[src],), len(self.bounds)))
        self.bounds.append(b)

    def dispatch(self, node: fx.Node, data: list[fx.Node], out_shape) -> Step | None:
        """The step of one data node (a layer step is appended through :meth:`layer`)."""
        t, index = node.target, self.index
        first = node.args[0] if node.args else None
        shape = self.shapes[index[data[0]]]
        if node.op == "call_module":
            if len(data) != 1 or first is not data[0]:
                raise refuse(
                    node, "a module called on several data inputs", "Call it on one tensor."
                )
            self.layer(first, self.make(self.gm.get_submodule(t), shape))
            return None
        if t in CATS:
            dim = self.const(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
            parts = node.args[0]
            if any(p not in index for p in parts) or dim % (len(out_shape) + 1) == 0:
                raise refuse(
                    node,
                    "a concatenation along the batch, or with constant parts",
                    "Concatenate data tensors along a feature dimension (dim=1).",
                )
            return Step("cat", tuple(index[p] for p in parts))
        pair = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in index]
        if t in SCALES and len(pair) == 2:
            raise refuse(
                node,
                "the product or quotient of two data-dependent values has no global "
                "Lipschitz bound",
                "Multiply or divide by constants only (gating x·σ(x) as a whole: use nn.SiLU).",
            )
        if t in ADDS and len(pair) == 2:  # (x + x too: one input node, used twice)
            broadcast = any(self.shapes[index[a]] != out_shape for a in node.args[:2])
            if node.kwargs.get("alpha", 1) != 1 or broadcast:
                raise refuse(
                    node,
                    "a sum whose terms broadcast or are scaled by alpha",
                    "Add tensors of the same shape; scale a term before adding.",
                )
            return Step("add", (index[node.args[0]], index[node.args[1]]))
        if (t in ADDS or t in SCALES) and len(data) == 1:
            others = [a for a in (*node.args, *node.kwargs.values()) if a is not data[0]]
            if len(others) == 1 and getattr(others[0], "op", None) == "get_attr":
                self.layer(data[0], self.tensor_operand(node, others[0], shape, out_shape))
                return None
            scalar = self.const(others[0]) if len(others) == 1 else None
            if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
                raise refuse(
                    node,
                    f"combining the data with {scalar!r} (a tensor, or several "
                    "operands) has no bound here",
                    "Use a Python number, or an nn module with a registered bound.",
                )
            d = math.prod(out_shape)
            self.layer(data[0], scalar_bound(node, float(scalar), first is data[0], d))
            return None
        if t in RESHAPES and first is data[0]:  # the sizes may come from x.size(0): not read
            self.layer(first, ConstantBound(1.0, str(getattr(t, "__name__", t))))
            return None
        if len(data) == 1 and first is data[0]:
            args, kwargs = self.const(tuple(node.args[1:])), self.const(dict(node.kwargs))
            b = function_bound(node, args, kwargs, shape, self.make)
            if b is not None:
                self.layer(first, b)
                return None
        raise refuse(
            node,
            "no Lipschitz bound is known for this op",
            "Use a supported op "
            "(docs/bounds.md lists them), or wrap it in an nn.Module with a bound "
            "registered by torchgloro.register_bound.",
        )


def _same(a: object, b: object) -> bool:
    """Whether two recorded static values are equal (tensors: same shape and entries)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape == b.shape and bool(torch.equal(a, b)))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _is_static(node: fx.Node) -> bool:
    """A shape query on data (``x.size()``, ``x.shape``, ``x.dim()``): no data flows on."""
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.target in STATIC


def _check_in_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """An op that overwrites its input must be that input's only user."""
    t = node.target
    mod = gm.get_submodule(t) if node.op == "call_module" else None
    in_place = (
        bool(getattr(mod, "inplace", False))
        or bool(node.kwargs.get("inplace", False))
        or (isinstance(t, str) and t.endswith("_") and not t.startswith("_"))
    )
    src = node.args[0] if node.args else None
    if in_place and isinstance(src, fx.Node) and len(src.users) > 1:
        raise refuse(
            node,
            "it overwrites its input in place, which other ops also read",
            "Use the out-of-place form (inplace=False).",
        )
