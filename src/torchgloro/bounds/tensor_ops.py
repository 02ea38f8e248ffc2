"""A data tensor combined with a model's own tensor: ``x * self.gamma``, ``x / self.scale``,
``x + self.pos_embedding`` (a learned per-channel scale, a fixed shift, ...).

With the tensor t broadcast over each sample (it must not reach across the batch, and the
result must keep the data's shape), ``z ↦ t ⊙ z`` is diagonal with entries from t, so its
ℓ2 norm is max|t| (``z ↦ z / t``: 1/min|t|), and a shift ``z ↦ z ± t`` has Lipschitz
constant 1. Each rounds once per entry.
"""

from __future__ import annotations

import torch
from torch import nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds.registry import LayerBound
from torchgloro.margins import NORM_UNDERFLOW_F64, UNIT_ROUNDOFF_F64, round_up

__all__ = ["TensorOperandBound", "tensor_operand_ok"]


class TensorOperandBound(LayerBound):
    """``z * t``, ``z / t`` or ``z ± t`` for a parameter, buffer or constant ``t`` of the model.

    Args:
        kind: ``"mul"``, ``"div"`` or ``"add"``.
        owner: The module that holds ``t`` (``owner.<name>``), read afresh at every use: a
            learned ``t`` changes, and ``.to()`` replaces buffers.
        name: Its attribute name.
        shape: The data's per-sample shape (``t`` broadcasts to it).
    """

    def __init__(self, kind: str, owner: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.kind = kind
        self.name = name
        self.shape = tuple(shape)
        object.__setattr__(self, "layer", owner)  # not a submodule: owned by the model

    def _t(self) -> torch.Tensor:
        return getattr(self.layer, self.name)

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        t = self._t() if differentiable and torch.is_grad_enabled() else self._t().detach()
        if self.kind == "mul":
            return t.abs().max()
        if self.kind == "div":
            return 1 / t.abs().min()
        return torch.ones((), device=t.device)

    def iterate(self, n_iter: int) -> None:
        pass  # exact: nothing to iterate

    def _gain(self) -> float:
        t = self._t().detach().double().abs()
        if self.kind == "mul":
            return round_up(t.max().item(), 2)
        if self.kind == "div":
            low = t.min().item()
            if not low > 0:
                raise UnsupportedLayerError(
                    "A divisor tensor of the model has a zero entry: z / t has no finite "
                    "Lipschitz bound. Keep the divisor away from 0 (e.g. t.abs() + eps)."
                )
            return round_up(1 / low, 4)
        return 1.0

    def sound(self) -> float:
        return self._gain()

    def fp_terms(self) -> tuple[int, float, float]:
        if self.kind != "add":  # fl(t·z), fl(z/t): |err| ≤ u·|result| ≤ u·gain·|z|
            return 1, self._gain(), 0.0
        full = self._t().detach().double().expand(self.shape)  # t as added to one sample
        grow = 1 + 2 * (full.numel() + 2) * UNIT_ROUNDOFF_F64
        b = full.norm().item() * grow + NORM_UNDERFLOW_F64
        return 1, 1.0, round_up(b * (1 + 1e-12), 4)

    def extra_repr(self) -> str:
        return f"{self.kind} by a tensor of shape {tuple(self._t().shape)}"


def tensor_operand_ok(tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``tensor`` broadcasts to one sample of ``shape`` without changing it."""
    try:
        return torch.broadcast_shapes(tuple(tensor.shape), (1, *shape)) == (1, *shape)
    except RuntimeError:
        return False
