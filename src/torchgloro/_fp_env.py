"""The floating-point environment that proofs assume, set for a block and restored exactly.

Certified quantities (sound logits, proven bounds, the frozen power-iteration estimate) are
computed in plain IEEE arithmetic whatever the caller set:

- no autocast (:func:`no_autocast`);
- no TF32 or bfloat16 inside float32 matrix products and convolutions (:func:`ieee_precision`);
- IEEE subnormals, on the calling thread and on every thread of PyTorch's intra-op pool
  (:func:`gradual_underflow`).

Each setting is process state that belongs to the caller: it is restored exactly afterwards,
including *how* it was set (an ``fp32_precision`` owner that inherited its value from its
parent inherits it again, see :func:`fp32_snapshot`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

_F = TypeVar("_F", bound=Callable)

# ---- autocast ------------------------------------------------------------------------------


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off on the CPU and CUDA for the enclosed block.

    A caller's ``torch.autocast`` would run the float32 backbone's convolutions and matrix
    products in bfloat16 or float16, whose round-off the float32 model does not cover, and
    the power iteration and proven bounds at that precision too.
    """
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def autocast_off(fn: _F) -> _F:
    """Decorates ``fn`` to run under :func:`no_autocast`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---- GELU on PyTorch's own kernel ---------------------------------------------------------


class _OwnGeluKernel(torch.overrides.TorchFunctionMode):
    """Runs every GELU call (``nn.GELU``, ``F.gelu``) with oneDNN off, so that a float32 CPU
    GELU uses PyTorch's own kernel: x/2·(1 + erf(x/√2)) with the Abramowitz–Stegun 7.1.26 erf
    and SLEEF's 1-ulp exp, whose error docs/soundness.md §14b bounds. With oneDNN on, PyTorch
    sends contiguous float32 inputs to oneDNN's GELU, a polynomial with no documented
    error bound. Other ops pass through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch._C._nn.gelu:
            return func(*args, **(kwargs or {}))
        mkldnn = torch.backends.mkldnn
        prev = mkldnn.enabled
        mkldnn.enabled = False
        try:
            return func(*args, **(kwargs or {}))
        finally:
            mkldnn.enabled = prev


def own_gelu_kernel() -> contextlib.AbstractContextManager:
    """GELU on PyTorch's own kernel for the enclosed block (:class:`_OwnGeluKernel`)."""
    return _OwnGeluKernel()


# ---- fp32_precision owners -----------------------------------------------------------------
#
# PyTorch keeps one ``fp32_precision`` per (backend, op) in a tree: ("generic", "all") at the
# top, then ("cuda" | "mkldnn", "all"), then the per-op leaves. A node set to "none" inherits
# its parent's value, and reading a node returns the inherited value: what was *set* is not
# readable directly. Writing back what was read would turn an inherited value into an
# explicit one that outlives the caller's later changes of the parent.

_Node = tuple[str, str]


def _node_exists(node: _Node) -> bool:
    try:
        torch._C._get_fp32_precision_getter(*node)
    except (AttributeError, RuntimeError, ValueError):
        return False
    return True


def _build_tree() -> tuple[tuple[_Node, _Node | None], ...]:
    """``(node, parent)`` pairs, parents before children; empty before the API existed."""
    top = ("generic", "all")
    if not _node_exists(top):
        return ()
    tree: list[tuple[_Node, _Node | None]] = [(top, None)]
    for backend in ("cuda", "mkldnn"):
        if not _node_exists((backend, "all")):
            continue
        tree.append(((backend, "all"), top))
        tree.extend(
            ((backend, op), (backend, "all"))
            for op in ("conv", "matmul", "rnn")
            if _node_exists((backend, op))
        )
    return tuple(tree)


_TREE = _build_tree()
# The owners whose values reach float32 products in a certified pass (cuDNN is off there).
_STRICT = tuple(n for n, _ in _TREE if n in {("cuda", "matmul"), ("mkldnn", "matmul"),
                                             ("mkldnn", "conv")})  # fmt: skip
# Effective values that already mean plain IEEE float32.
_IEEE = ("ieee", "none")


def _read(node: _Node) -> str:
    return torch._C._get_fp32_precision_getter(*node)


def _write(node: _Node, value: str) -> None:
    torch._C._set_fp32_precision_setter(*node, value)


def fp32_snapshot() -> dict[_Node, str]:
    """What was *set* on each ``fp32_precision`` owner: a value, or ``"none"`` (inherited).

    A node that reads other than ``"none"`` is probed: its parent is set to another value
    for an instant, and the node inherits iff it follows. The parent is then set back to what
    was set on it (known, as parents are probed first), so nothing has changed afterwards.
    (Reading alone cannot tell: a node may also read a backend default that yields to any
    value set above it, as cuDNN's convolutions read ``"tf32"`` in a fresh process.)
    """
    raw: dict[_Node, str] = {}
    for node, parent in _TREE:
        value = _read(node)
        if parent is None or value == "none":
            raw[node] = value
            continue
        probe = "tf32" if value == "ieee" else "ieee"
        _write(parent, probe)
        try:
            raw[node] = "none" if _read(node) == probe else value
        finally:
            _write(parent, raw[parent])
    return raw


def fp32_restore(raw: dict[_Node, str], nodes: tuple[_Node, ...]) -> None:
    """Sets ``nodes`` back to what a :func:`fp32_snapshot` found set on them.

    Only the nodes written since should be restored: writing a node ends a backend default
    it may have read before (see :func:`fp32_snapshot`).
    """
    for node in nodes:
        _write(node, raw[node])


@contextlib.contextmanager
def ieee_precision() -> Iterator[None]:
    """Full float32 precision in matrix products and convolutions (no TF32, no bfloat16).

    Nothing is written when every owner already computes in IEEE float32 (the default).
    Otherwise the owners are set for the block and restored exactly afterwards, inherited
    values as inherited (:func:`fp32_snapshot`). PyTorch before the ``fp32_precision`` API:
    the legacy matmul precision and TF32 flag instead.
    """
    if not _TREE:
        legacy = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cuda.matmul.allow_tf32 = legacy[1]
        return
    if all(_read(n) in _IEEE for n in _STRICT):
        yield
        return
    raw = fp32_snapshot()
    for node in _STRICT:
        _write(node, "ieee")
    try:
        yield
    finally:
        fp32_restore(raw, _STRICT)


# ---- subnormals ----------------------------------------------------------------------------

# The smallest float32 subnormal, made from its bits: arithmetic at import time would give 0
# if the importing thread already flushed denormals.
_SUBNORMAL, _ONE = np.array([1], dtype=np.uint32).view(np.float32)[0], np.float32(1.0)
# Elements per thread of the pool probe: at::parallel_for's grain for elementwise ops, so
# that every thread of the pool computes one chunk.
_GRAIN = 32768
_probe_cache: dict[int, torch.Tensor] = {}


def flushes_on_this_thread() -> bool:
    """Whether this thread flushes subnormals (DAZ/FTZ): numpy's scalar product runs here."""
    return bool(_SUBNORMAL * _ONE == 0)


def pool_flushes() -> bool:
    """Whether any thread of PyTorch's intra-op pool flushes subnormals.

    A thread created while ``torch.set_flush_denormal(True)`` was on inherits the setting
    and keeps it: switching it off later reaches only the calling thread. A product of
    subnormals spread over every thread of the pool shows it; the result is compared bit by
    bit, as a flushing thread would also read a subnormal as 0 in a comparison.
    """
    n = torch.get_num_threads()
    if n <= 1:
        return False
    x = _probe_cache.get(n)
    if x is None:
        x = torch.full((n * _GRAIN,), float(_SUBNORMAL), dtype=torch.float32)
        _probe_cache.clear()
        _probe_cache[n] = x
    return bool(((x * 1.0).view(torch.int32) == 0).any())


@contextlib.contextmanager
def gradual_underflow() -> Iterator[None]:
    """IEEE subnormals for the enclosed block, on every thread that computes in it.

    ``torch.set_flush_denormal(True)`` makes the CPU read subnormal inputs as 0 and flush
    subnormal results to 0 (DAZ/FTZ): a subnormal weight times a huge activation is then
    lost whole, outside the round-off model (relative γ_n plus a tiny absolute term per
    layer). It is switched off on this thread, and back on afterwards if it was on. Threads of
    the intra-op pool cannot be reached from here: if any of them flushes
    (:func:`pool_flushes`), the block runs on this thread alone (``torch.set_num_threads(1)``,
    restored afterwards), slower but exact.
    """
    flushing = flushes_on_this_thread()
    if flushing:
        torch.set_flush_denormal(False)
    threads = torch.get_num_threads() if pool_flushes() else None
    if threads is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        if flushing:
            torch.set_flush_denormal(True)


def ieee_arithmetic(fn: _F) -> _F:
    """Decorates ``fn`` to run in the environment proofs assume (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast(), ieee_precision(), gradual_underflow():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
