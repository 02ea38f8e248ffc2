"""Lipschitz-1, gradient-norm-preserving activations: MinMax and GroupSort."""

from __future__ import annotations

import torch
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = ["group_sort", "GroupSort", "MinMax"]


def group_sort(x: torch.Tensor, group_size: int = 2, dim: int = 1) -> torch.Tensor:
    """Sorts consecutive groups of ``group_size`` features along ``dim`` (ascending).

    Sorting is a permutation on each linear region, so it is 1-Lipschitz in ℓ2 and
    preserves gradient norms (Anil et al., 2019). ``group_size=2`` is MinMax.

    Args:
        x: Input tensor.
        group_size: Size of each sorted group; must divide ``x.shape[dim]``.
        dim: The feature (channel) dimension.

    Returns:
        A tensor of the same shape as ``x``.
    """
    n = x.shape[dim]
    if n % group_size:
        raise GloroInputError(
            f"GroupSort(group_size={group_size}) needs a feature count divisible by the group "
            f"size, got {n} features on dim {dim}; choose a width that is a multiple of "
            f"{group_size}."
        )
    dim = dim % x.dim()
    shape = x.shape[:dim] + (n // group_size, group_size) + x.shape[dim + 1 :]
    if group_size == 2:
        if _transformed(x):  # torch.func (vmap, jacrev, ...): plain differentiable ops
            a, b = x.reshape(shape).unbind(dim + 1)
            out = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim + 1)
            return out.reshape(x.shape)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MinMax.apply(x, shape, dim + 1)
        return _min_max(x, shape, dim + 1)[0]
    return x.reshape(shape).sort(dim=dim + 1).values.reshape(x.shape)


_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform, where _MinMax's out= writes and
    its autograd.Function (no setup_context) do not work. Never while torch.compile traces:
    it cannot trace the probe (a graph break), and compiles _MinMax itself."""
    return not torch.compiler.is_compiling() and _is_wrapped(x)


def _min_max(x: torch.Tensor, pairs: tuple[int, ...], pair_dim: int):
    """MinMax of ``x`` written straight into the output: ``(out, a, b)`` with ``a, b`` the
    first and second member of each pair (views of ``x``)."""
    a, b = x.reshape(pairs).unbind(pair_dim)
    out = torch.empty_like(x)  # x's memory format (channels-last stays channels-last)
    lo, hi = out.view(pairs).unbind(pair_dim)
    torch.minimum(a, b, out=lo)
    torch.maximum(a, b, out=hi)
    return out, a, b


class _MinMax(torch.autograd.Function):
    """MinMax with a lean backward (the same gradient as autograd's through
    ``torch.minimum``/``torch.maximum``, which costs several masked passes).

    Saves ``w`` = 1 where a pair's first member is the larger (it went to the max slot), 0
    where it is the smaller, 1/2 on ties (autograd's split), in bfloat16; then
    ∂a = lerp(∂lo, ∂hi, w) and ∂b = lerp(∂hi, ∂lo, w): exact off ties (lerp with weight 0
    or 1 returns an endpoint), and within an ulp of the half-sum on ties.
    """

    @staticmethod
    def forward(ctx, x, pairs, pair_dim):
        out, a, b = _min_max(x, pairs, pair_dim)
        # a − b is 0 exactly on ties (gradual underflow), so its sign tells the three cases.
        # 0, 1/2 and 1 are exact in bfloat16: 1 byte per activation instead of 4 for x.
        w = torch.sign(a - b).mul_(0.5).add_(0.5).to(torch.bfloat16)
        ctx.save_for_backward(w)
        ctx.pairs, ctx.pair_dim = pairs, pair_dim
        return out

    @staticmethod
    def backward(ctx, grad):
        w = ctx.saved_tensors[0].to(grad.dtype)
        g_lo, g_hi = grad.reshape(ctx.pairs).unbind(ctx.pair_dim)
        if torch.is_grad_enabled():  # double backward: out= is not differentiable
            gx = torch.stack((torch.lerp(g_lo, g_hi, w), torch.lerp(g_hi, g_lo, w)), ctx.pair_dim)
            return gx.reshape(grad.shape), None, None
        gx = torch.empty_like(grad)
        g_a, g_b = gx.view(ctx.pairs).unbind(ctx.pair_dim)
        torch.lerp(g_lo, g_hi, w, out=g_a)
        torch.lerp(g_hi, g_lo, w, out=g_b)
        return gx, None, None


class GroupSort(nn.Module):
    """GroupSort activation over the channel dimension (dim 1). Lipschitz constant 1."""

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if group_size < 2:
            raise GloroInputError(f"GroupSort group_size must be >= 2, got {group_size}.")
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_sort(x, self.group_size, dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MinMax(GroupSort):
    """MinMax activation, i.e. GroupSort with groups of 2. Lipschitz constant 1."""

    def __init__(self) -> None:
        super().__init__(group_size=2)

    def extra_repr(self) -> str:
        return ""
