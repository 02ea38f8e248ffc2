"""Training losses for GloRo nets, on ``(B, C+1)`` logits whose last column is ⊥."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = ["GloroCrossEntropy", "GloroTrades", "check_labels"]


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Raises a clear error for labels outside ``[0, num_classes)`` (CPU tensors only).

    On accelerators the check is skipped to avoid a host sync; the data pipeline validates
    labels once when a dataset is loaded.
    """
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise GloroInputError(f"labels must be an integer tensor, got {y.dtype}.")
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise GloroInputError(
            f"labels must lie in [0, {num_classes}), got values in [{int(y.min())}, "
            f"{int(y.max())}]; check the dataset's num_classes."
        )


class GloroCrossEntropy(nn.Module):
    """Cross-entropy over the C+1 outputs, with ⊥ a class that is never correct."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_labels(y, logits.shape[1] - 1)
        return F.cross_entropy(logits, y)


class GloroTrades(nn.Module):
    """The TRADES loss for GloRo nets (Leino et al., 2021, Definition 3).

    ``CE(f(x), y) + λ · KL(softmax(f(x)) ‖ softmax(f̄ε(x)))``, where ``softmax(f(x))`` is
    extended with probability 0 on ⊥: the GloRo net is asked to agree with the clean
    prediction while assuming the clean prediction is right.

    Args:
        lam: The weight λ (settable; schedules update it).
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = float(lam)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1] - 1
        check_labels(y, num_classes)
        clean = logits[:, :num_classes]  # (B, C)
        clean_loss = F.cross_entropy(clean, y)
        log_p = F.log_softmax(clean, dim=1)  # (B, C)
        log_q = F.log_softmax(logits, dim=1)[:, :num_classes]  # (B, C): ⊥ has p = 0
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
        return clean_loss + self.lam * kl

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}"
