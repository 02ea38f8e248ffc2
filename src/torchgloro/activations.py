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
    grouped = x.reshape(shape)
    if group_size == 2:
        a, b = grouped.unbind(dim + 1)
        out = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim + 1)
    else:
        out = grouped.sort(dim=dim + 1).values
    return out.reshape(x.shape)


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
