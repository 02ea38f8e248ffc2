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

from torchgloro._errors import UnsupportedLayerError
from torchgloro._net_attributes import eval_mode
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
from torchgloro.bounds.registry import ConstantBound, LayerBound
from torchgloro.bounds.tensor_ops import TensorOperandBound, tensor_operand_ok
from torchgloro.bounds.trace import writes_in_place

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
) -> tuple[list[Step], list[LayerBound], int, list[str]]:
    """Steps and layer bounds of ``gm`` up to its head's input (whose value index is returned),
    and the name of the graph node that computes each value (value 0: the input).

    Raises:
        UnsupportedLayerError: a node without a global bound, with its line in the code.
    """
    return _Planner(gm, tuple(in_shape), make).run()


class _Planner:
    """Walks a graph once, node by node, recording each data node's step."""

    def __init__(self, gm: fx.GraphModule, in_shape: tuple[int, ...], make: Make) -> None:
        self.gm, self.in_shape, self.make = gm, in_shape, make
        for node in gm.graph.nodes:  # before the graph runs on the model's tensors
            _check_model_writes(gm, node)
        self.va, self.vb = _record(gm, in_shape, 2), _record(gm, in_shape, 3)
        self._v1: dict[fx.Node, object] | None = None
        self.index: dict[fx.Node, int] = {}  # data node -> value index
        self.shapes: dict[int, tuple[int, ...]] = {}  # value index -> per-sample shape
        self.steps: list[Step] = []
        self.bounds: list[LayerBound] = []

    def run(self) -> tuple[list[Step], list[LayerBound], int, list[str]]:
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
            if writes_in_place(self.gm, node) or "out" in node.kwargs:
                _check_in_place(node, (self.va, self.one_input()))
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
        names = [""] * (len(self.steps) + 1)
        for node, k in self.index.items():
            names[k] = node.name
        return self.steps, self.bounds, self.index[src], names

    def one_input(self) -> dict[fx.Node, object]:
        """Every node's value on a batch of one, where aliasing may differ (``h[:, :k]`` is
        contiguous there, so ``.contiguous()`` returns it): recorded on first need."""
        if self._v1 is None:
            self._v1 = _record(self.gm, self.in_shape, 1)
        return self._v1

    def const(self, a: object) -> object:
        """A static argument's value, which must be the same for any batch."""
        if isinstance(a, fx.Node):
            if _reads_model_tensors(a):
                raise refuse(
                    a,
                    "its value comes from the model's parameters or buffers (a weight passed "
                    "to a function, `p.item()`), which a bound built once would not follow "
                    "when they change",
                    "Call the module (self.fc(h), not F.linear(h, self.fc.weight)), or use a "
                    "Python constant.",
                )
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
        if isinstance(a, dict):
            return {k: self.const(v) for k, v in a.items()}
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

    def check_reshape(self, node: fx.Node, ndim: int) -> None:
        """Refuses the reshapes that are not one per input on every batch: a view as another
        dtype (``h.view(torch.int32)`` reinterprets bits), and a squeeze that may drop the
        batch dimension (``h.squeeze()`` on a batch of 1)."""
        args = (*node.args[1:], *node.kwargs.values())
        values = [self.va[a] if isinstance(a, fx.Node) else a for a in args]
        if any(isinstance(v, torch.dtype) for v in values):
            raise refuse(
                node,
                "a view as another dtype reinterprets the bits, which has no Lipschitz bound",
                "Convert values with a supported op, or drop the view.",
            )
        if node.target in (torch.squeeze, "squeeze"):
            dims = self.const(args[0]) if args else None
            dims = (dims,) if isinstance(dims, int) else dims
            if dims is None or any(d % ndim == 0 for d in dims):
                raise refuse(
                    node,
                    "a squeeze without dims (or of dim 0) also drops the batch dimension of "
                    "a batch of one input",
                    "Name the per-sample dims to squeeze, e.g. h.squeeze(2).",
                )

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
            if len(node.args) > 1 or node.kwargs:  # its bound is for module(x) alone
                raise refuse(
                    node,
                    "a module called with arguments besides its input, which its bound "
                    "(of module(x)) does not describe",
                    "Call the module on its input alone; fix other settings when building it.",
                )
            self.layer(first, self.make(self.gm.get_submodule(t), shape))
            return None
        if t in CATS:
            dim = self.const(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
            parts = node.kwargs.get("tensors", node.args[0] if node.args else ())
            if any(p not in index for p in parts) or dim % (len(out_shape) + 1) == 0:
                raise refuse(
                    node,
                    "a concatenation along the batch, or with constant parts",
                    "Concatenate data tensors along a feature dimension (dim=1).",
                )
            return Step("cat", tuple(index[p] for p in parts))
        terms = [*node.args[:2], *(node.kwargs[k] for k in ("input", "other") if k in node.kwargs)]
        pair = [a for a in terms[:2] if isinstance(a, fx.Node) and a in index]
        if t in SCALES and len(pair) == 2:
            raise refuse(
                node,
                "the product or quotient of two data-dependent values has no global "
                "Lipschitz bound",
                "Multiply or divide by constants only (gating x·σ(x) as a whole: use nn.SiLU).",
            )
        if t in ADDS and len(pair) == 2:  # (x + x too: one input node, used twice)
            broadcast = any(self.shapes[index[a]] != out_shape for a in pair)
            if node.kwargs.get("alpha", 1) != 1 or broadcast:
                raise refuse(
                    node,
                    "a sum whose terms broadcast or are scaled by alpha",
                    "Add tensors of the same shape; scale a term before adding.",
                )
            return Step("add", (index[pair[0]], index[pair[1]]))
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
            self.check_reshape(node, len(shape) + 1)
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


def _reads_model_tensors(node: fx.Node) -> bool:
    """Whether a static value is computed from the model's parameters or buffers (a shape
    query on them aside: shapes are fixed, :mod:`torchgloro.bounds.structure`)."""
    seen, pending = set(), [node]
    while pending:
        n = pending.pop()
        if n.op == "get_attr":
            return True
        if n in seen or _is_static(n):
            continue
        seen.add(n)
        pending += n.all_input_nodes
    return False


def _is_static(node: fx.Node) -> bool:
    """A shape query on data (``x.size()``, ``x.shape``, ``x.dim()``): no data flows on."""
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.target in STATIC


def _check_in_place(node: fx.Node, records: tuple[dict, ...]) -> None:
    """An op that writes into a tensor must be the only reader of that memory.

    ``out=`` is refused. An op that overwrites its input must be the only user
    of it and of every value it is a view of (``h.view(...)``, ``h[:, :k]``, ``nn.Identity``,
    eval-mode dropout: found by shared storage in any of the recorded runs ``records``), else
    another branch would read the overwritten values through an alias that its bound does
    not describe.
    """
    if "out" in node.kwargs:
        raise refuse(
            node,
            "it writes its result into an existing tensor (out=), which other ops may read",
            "Use the returned value instead of out=.",
        )
    src = node.args[0] if node.args else None
    pending = [src] if isinstance(src, fx.Node) else []
    while pending:
        n = pending.pop()
        if len(n.users) > 1:
            raise refuse(
                node,
                f"it overwrites its input in place, and that memory is also read by other "
                f"ops (through `{n.name}`)",
                "Use the out-of-place form (inplace=False, or h.relu() for h.relu_()).",
            )
        pending += [
            a for a in n.all_input_nodes if any(_shares_memory(v.get(n), v.get(a)) for v in records)
        ]


def _check_model_writes(gm: fx.GraphModule, node: fx.Node) -> None:
    """Refuses a forward that writes into the model's parameters or buffers
    (``self.fc.weight.mul_(2)``): every call would run another network than the bounded one."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return
    written = node.kwargs.get("out")
    if written is None and writes_in_place(gm, node) and node.args:
        written = node.args[0]
    if isinstance(written, fx.Node) and _reads_model_tensors(written):
        raise refuse(
            node,
            "it writes into the model's parameters or buffers, so each forward runs a "
            "different network than the one bounded",
            "Change weights outside the forward (then the bounds follow them).",
        )


def _shares_memory(a: object, b: object) -> bool:
    """Whether two recorded values are tensors on the same storage (one views the other)."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )
