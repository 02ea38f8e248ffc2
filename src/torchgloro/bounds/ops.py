"""What each node of a traced graph does to Lipschitz bounds: one :class:`Step` per node.

A step is a ``layer`` (one data input through a :class:`~torchgloro.bounds.registry.LayerBound`:
a registered module, an activation function, a constant scale or shift, a reshape), an
``add`` (a sum of branches: bounds add) or a ``cat`` (a concatenation: bounds add in
squares). Any other use of the data is refused by :func:`refuse`, naming the op, its line
in the user's code and what to do instead.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds.registry import ConstantBound, LayerBound, float32_relative
from torchgloro.bounds.trace import node_location
from torchgloro.margins import round_up

__all__ = ["Step", "refuse", "function_bound", "scalar_bound"]


@dataclass(frozen=True)
class Step:
    """One graph value: ``kind`` applied to the values ``inputs`` (0 is the graph's input)."""

    kind: str  # "layer", "add" or "cat"
    inputs: tuple[int, ...]
    bound: int = -1  # index of the layer's bound (kind "layer")


def refuse(node: fx.Node, why: str, fix: str) -> UnsupportedLayerError:
    """The error for a node without a global bound."""
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node)
    return UnsupportedLayerError(
        f"Cannot bound `{op}` (graph node {node.name}){node_location(node)}: {why}. {fix}"
    )


# Ops that only move entries around (flatten, view, permute, ...): Lipschitz 1, exact.
RESHAPES: set[Any] = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.clone, "view", "reshape", "flatten", "permute", "transpose",
    "contiguous", "unsqueeze", "squeeze", "clone",
}  # fmt: skip
# Sums of two values: x + y, x - y.
# (In-place forms: the graph checks that nothing else reads the overwritten input.)
ADDS: set[Any] = {
    operator.add, operator.sub, torch.add, torch.sub, "add", "sub", "add_", "sub_",
    operator.iadd, operator.isub,
}  # fmt: skip
# Calls whose results are shapes, not data.
STATIC: set[Any] = {"size", "dim"}  # and getattr of shape, ndim, dtype, device
DIVS: set[Any] = {operator.truediv, torch.div, "div", "div_", operator.itruediv}
SCALES: set[Any] = {operator.mul, torch.mul, "mul", "mul_", operator.imul, *DIVS}
NEGS: set[Any] = {operator.neg, torch.neg, "neg"}
CATS: set[Any] = {torch.cat, torch.concat}
MEANS: set[Any] = {torch.mean, "mean"}


def _bind(args: tuple, kwargs: dict, names: list[str], defaults: dict) -> dict:
    """The arguments after the input, by name (positional ones matched to ``names``)."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


# Functions with a module equivalent: (module factory, argument names after the input,
# defaults). The module's registered bound then applies.
_FUNCTIONS: dict[Any, tuple[Any, list[str], dict]] = {
    F.relu: (lambda a: nn.ReLU(), ["inplace"], {}),
    torch.relu: (lambda a: nn.ReLU(), [], {}),
    "relu": (lambda a: nn.ReLU(), [], {}),
    torch.tanh: (lambda a: nn.Tanh(), [], {}),
    F.tanh: (lambda a: nn.Tanh(), [], {}),
    "tanh": (lambda a: nn.Tanh(), [], {}),
    torch.sigmoid: (lambda a: nn.Sigmoid(), [], {}),
    F.sigmoid: (lambda a: nn.Sigmoid(), [], {}),
    "sigmoid": (lambda a: nn.Sigmoid(), [], {}),
    F.gelu: (lambda a: nn.GELU(a["approximate"]), ["approximate"], {"approximate": "none"}),
    F.silu: (lambda a: nn.SiLU(), ["inplace"], {}),
    F.leaky_relu: (
        lambda a: nn.LeakyReLU(a["negative_slope"]),
        ["negative_slope", "inplace"],
        {"negative_slope": 0.01},
    ),
    F.elu: (lambda a: nn.ELU(a["alpha"]), ["alpha", "inplace"], {"alpha": 1.0}),
    F.softplus: (
        lambda a: nn.Softplus(a["beta"], a["threshold"]),
        ["beta", "threshold"],
        {"beta": 1.0, "threshold": 20.0},
    ),
    F.hardtanh: (
        lambda a: nn.Hardtanh(a["min_val"], a["max_val"]),
        ["min_val", "max_val", "inplace"],
        {"min_val": -1.0, "max_val": 1.0},
    ),
    F.relu6: (lambda a: nn.ReLU6(), ["inplace"], {}),
    F.adaptive_avg_pool2d: (lambda a: nn.AdaptiveAvgPool2d(a["output_size"]), ["output_size"], {}),
    F.avg_pool2d: (
        lambda a: nn.AvgPool2d(
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["ceil_mode"],
            a["count_include_pad"],
            a["divisor_override"],
        ),  # fmt: skip
        ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
        {
            "stride": None,
            "padding": 0,
            "ceil_mode": False,
            "count_include_pad": True,
            "divisor_override": None,
        },  # fmt: skip
    ),
    F.max_pool2d: (
        lambda a: nn.MaxPool2d(
            a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"]
        ),  # fmt: skip
        ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
    ),
}


def function_bound(
    node: fx.Node,
    args: tuple,
    kwargs: dict,
    shape: tuple[int, ...],
    make: Any,
) -> LayerBound | None:
    """The bound of a one-input function node ``f(x, *args, **kwargs)``, or None if unknown.

    ``args``/``kwargs`` are the node's arguments after the data input, with static values
    resolved; ``shape`` its per-sample input shape; ``make`` builds a module's bound (the
    registry).
    """
    t = node.target
    if t in NEGS:
        return ConstantBound(1.0, "neg")  # exact
    if t is operator.getitem:
        return _getitem(node, args[0], len(shape))
    if t in MEANS:
        return _mean(node, args, kwargs, shape)
    if t is F.dropout or t is torch.dropout:
        a = _bind(args, kwargs, ["p", "training", "inplace"], {"training": True})
        if a["training"]:
            raise refuse(
                node,
                "F.dropout(training=True) drops entries in every forward, "
                "including certification's",
                "Use an nn.Dropout module, which is the identity in eval mode.",
            )
        return ConstantBound(1.0, "dropout")
    if t in _FUNCTIONS:
        factory, names, defaults = _FUNCTIONS[t]
        return make(factory(_bind(args, kwargs, names, defaults)), shape)
    return None


def scalar_bound(node: fx.Node, scalar: float, data_first: bool, d: int) -> LayerBound:
    """``x·c``, ``x/c``, ``x ± c``, ``c − x`` with a constant number ``c`` (d entries).

    In a float32 pass PyTorch first rounds c to float32, and CUDA divides as a product by
    fl(1/c): one rounding more for a shift, two more for a scale, each relative while c (and
    1/c) are normal float32 magnitudes (else the layer is certified on float64 alone).
    """
    t = node.target
    name = getattr(t, "__name__", t)
    if t in ADDS:  # fl(z + fl(c)): |err| ≤ u|c| + u|z + c|(1 + u) ≤ γ₂(|z| + |c|)
        b = round_up(abs(scalar) * math.sqrt(d) * (1 + 1e-12), 4)
        return ConstantBound(1.0, f"{name} {scalar:g}", fp_terms=(2, 1.0, b),
                             precision_free=float32_relative(scalar))  # fmt: skip
    if t in DIVS:
        if not data_first:
            raise refuse(
                node,
                "dividing by a data-dependent value has no global Lipschitz bound",
                "Divide by a constant, or drop the division.",
            )
        if scalar == 0:
            raise refuse(node, "division by zero", "Divide by a nonzero constant.")
        free = float32_relative(scalar, 1.0 / scalar)
        scalar = 1.0 / scalar
    else:
        free = float32_relative(scalar)
    c = round_up(abs(scalar), 2)
    # fl(z·fl(c)), fl(z/fl(c)) or fl(z·fl(1/fl(c))): |err| ≤ γ₃|c·z|.
    return ConstantBound(c, f"scale {scalar:g}", fp_terms=(3, c, 0.0), precision_free=free)


def _getitem(node: fx.Node, index: Any, ndim: int) -> LayerBound:
    """``x[index]`` on per-sample values of ``ndim`` dims: dim 0 must stay whole (``x[:, ...]``,
    or ``x[..., ...]`` whose other entries index at most the ``ndim`` per-sample dims)."""
    idx = index if isinstance(index, tuple) else (index,)
    ok = idx and (idx[0] == slice(None) or idx[0] is Ellipsis)
    ok = ok and all(isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in idx)
    ok = ok and (idx[0] != Ellipsis or sum(isinstance(i, (slice, int)) for i in idx) <= ndim)
    if not ok:
        raise refuse(
            node,
            f"indexing with {index!r} may select across the batch or repeat entries",
            "Index with slices that keep dimension 0 whole, e.g. x[:, :k].",
        )
    return ConstantBound(1.0, "getitem")  # selects entries: Lipschitz ≤ 1, exact


def _mean(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> LayerBound:
    a = _bind(args, kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
    dims = a["dim"]
    dims = (dims,) if isinstance(dims, int) else dims
    if dims is None or a.get("dtype") is not None or any(d % (len(shape) + 1) == 0 for d in dims):
        raise refuse(
            node,
            "a mean over the batch dimension (or with a dtype) mixes inputs",
            "Average over the per-sample dimensions only, e.g. x.mean((2, 3)).",
        )
    n = math.prod(shape[d % (len(shape) + 1) - 1] for d in dims)
    value = round_up(1 / math.sqrt(n), 2)
    # As an average pool: sums of n entries, then one division; partial sums ≤ √n·‖h‖.
    return ConstantBound(value, "mean", fp_terms=(n + 1, value, 0.0), peak_gain=math.sqrt(n))
