"""Plain data containers: :class:`DatasetInfo` and :class:`Split`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torchgloro._errors import GloroInputError

__all__ = ["DatasetInfo", "Split"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``in_shape`` is ``(C, H, W)`` for images. ``default_epsilon`` is the L2 radius the GloRo
    paper certifies at test time (``eps_test``) for the dataset, on inputs scaled to ``[0, 1]``;
    for datasets the paper does not use (Fashion-MNIST, digits, npz) it is a documented
    choice, see ``docs/data.md``. ``augment_by_default`` says whether the paper trains the
    dataset with the Appendix B augmentation (off for the MNIST family).
    """

    name: str
    classes: tuple[str, ...]
    in_shape: tuple[int, ...]
    default_epsilon: float
    augment_by_default: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Split:
    """One split of a dataset, fully in memory.

    ``x`` is ``(N, C, H, W)`` float32 in ``[0, 1]`` for the image datasets (``(N, *in_shape)``
    for data of other shapes given to ``tg.train``); ``y`` is ``(N,)`` int64 in
    ``0 .. info.num_classes - 1``.
    """

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.x.ndim < 2:
            raise GloroInputError(
                f"Split.x must be (N, *in_shape), e.g. images (N, C, H, W); got shape "
                f"{tuple(self.x.shape)}"
            )
        if tuple(self.x.shape[1:]) != tuple(self.info.in_shape):
            raise GloroInputError(
                f"Split.x has per-sample shape {tuple(self.x.shape[1:])}, but its dataset "
                f"says in_shape = {tuple(self.info.in_shape)}: reshape x to (N, "
                f"{', '.join(map(str, self.info.in_shape))}) or fix the DatasetInfo."
            )
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise GloroInputError(
                f"Split.y must be (N,) with N = {self.x.shape[0]}, got shape {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """Return a copy whose tensors live on ``device`` (no copy if already there)."""
        return Split(self.x.to(device), self.y.to(device), self.info)

    def require_model(self, num_classes: int, in_shape: Sequence[int]) -> None:
        """Raises unless a model of ``num_classes`` classes on ``in_shape`` inputs fits.

        A dataset with more classes than the model makes its accuracy and VRA meaningless
        (labels it can never predict), or crashes a loss on out-of-range targets.
        """
        name = self.info.name
        if tuple(self.x.shape[1:]) != tuple(in_shape):
            raise GloroInputError(
                f"Dataset {name!r} has images of shape {tuple(self.x.shape[1:])} but the model "
                f"takes {tuple(in_shape)}: use the dataset the model was trained on."
            )
        top = int(self.y.max()) if len(self) else -1
        if self.info.num_classes > num_classes or top >= num_classes:
            raise GloroInputError(
                f"Dataset {name!r} has {max(self.info.num_classes, top + 1)} classes but the "
                f"model has {num_classes}: use the dataset the model was trained on."
            )

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor) -> Split:
        """The first ``n`` samples (an ``int``) or the samples at the given indices."""
        if isinstance(n_or_indices, bool):
            raise GloroInputError("subset() takes an int or a sequence of indices, not a bool")
        if isinstance(n_or_indices, int):
            n = n_or_indices
            if n < 0 or n > len(self):
                raise GloroInputError(f"subset({n}): n must be in 0..{len(self)}")
            return Split(self.x[:n], self.y[:n], self.info)
        idx = torch.as_tensor(n_or_indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise GloroInputError(f"subset(): index out of range for a split of {len(self)}")
        idx = idx.to(self.x.device)
        return Split(self.x[idx], self.y[idx.to(self.y.device)], self.info)
