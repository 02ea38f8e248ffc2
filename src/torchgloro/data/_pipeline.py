"""A GPU-friendly batch iterator: the whole dataset lives as one tensor on the device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = ["DeviceBatches", "as_tensors"]


def as_tensors(dataset: Any, what: str = "DeviceBatches") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a :class:`Split` (or anything with tensors ``x`` and ``y``), of an
    ``(x, y)`` pair of tensors, of a ``TensorDataset`` of two tensors, or stacked from a
    dataset of ``(x, y)`` pairs.

    Raises:
        GloroInputError: ``dataset`` is none of these (the message starts with ``what``).
    """
    x, y = getattr(dataset, "x", None), getattr(dataset, "y", None)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x, y
    pair = dataset if isinstance(dataset, (tuple, list)) else getattr(dataset, "tensors", None)
    if isinstance(pair, (tuple, list)) and len(pair) == 2:  # (x, y), or a TensorDataset's
        if all(isinstance(t, torch.Tensor) for t in pair):
            return pair[0], pair[1]
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
        xs, ys = zip(*pairs) if pairs else ((), ())
        return torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor(ys)
    except (TypeError, ValueError, RuntimeError) as e:
        raise GloroInputError(
            f"{what} takes a Split, an (x, y) pair of tensors, a TensorDataset of (x, y) or a "
            f"dataset whose items are (x, y) pairs of equal shapes; {type(dataset).__name__} "
            f"is none of these ({e})."
        ) from e


class DeviceBatches:
    """Iterate over ``(x, y)`` batches of a dataset held as two tensors on ``device``.

    ``dataset`` is a :class:`Split`, a ``torch.utils.data.TensorDataset(x, y)``, or any
    dataset of ``(x, y)`` pairs (stacked once). It is moved to ``device`` once (default:
    where its ``x`` already is). Each
    epoch (each ``iter()``) draws one permutation with ``torch.randperm(N, generator=...)``
    when ``shuffle`` and slices it into batches; a batch is one indexing op on the
    device, with no per-sample Python. ``augment`` (e.g. :class:`Augment`) is applied to
    each batch on the device.

    Distributed data parallel: ``batch_size`` is the **global** batch size. Every rank
    must pass a generator seeded identically: all ranks then draw the same permutation
    and form the same global batches, and rank ``r`` yields the ``r``-th of
    ``world_size`` contiguous chunks of each (``torch.tensor_split``, sizes differing by
    at most one). Concatenating the ranks' shards in rank order gives exactly the
    single-process batch. The generator advances by one ``randperm`` per epoch on every
    rank. With ``world_size > 1`` a final partial batch with fewer than ``world_size``
    samples is dropped on every rank, so that all ranks take the same number of steps
    and no shard is empty.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        augment: nn.Module | None = None,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GloroInputError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise GloroInputError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise GloroInputError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if batch_size < world_size:
            raise GloroInputError(
                f"global batch_size {batch_size} is smaller than world_size {world_size}"
            )
        x, y = as_tensors(dataset)
        if len(x) == 0:
            raise GloroInputError("cannot batch an empty dataset")
        if len(y) != len(x):
            raise GloroInputError(f"x has {len(x)} samples but y has {len(y)}")
        self.device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(self.device), y.to(self.device)
        info = getattr(dataset, "info", None)
        self.name = getattr(info, "name", type(dataset).__name__)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.augment = augment
        self.rank, self.world_size = rank, world_size

    def _num_global_batches(self) -> int:
        n = len(self.x)
        full, rest = divmod(n, self.batch_size)
        keep_tail = rest > 0 and not self.drop_last and rest >= self.world_size
        return full + int(keep_tail)

    def __len__(self) -> int:
        return self._num_global_batches()

    def _order(self) -> torch.Tensor:
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        gen = self.generator
        gen_device = gen.device if gen is not None else torch.device("cpu")
        perm = torch.randperm(n, generator=gen, device=gen_device)
        return perm.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(self._num_global_batches()):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                idx = torch.tensor_split(idx, self.world_size)[self.rank]
            x, y = self.x[idx], self.y[idx]
            if self.augment is not None:
                x = self.augment(x)
            yield x, y

    @property
    def num_samples(self) -> int:
        """Samples per epoch across all ranks (after dropping any tail)."""
        n = len(self.x)
        return min(n, self._num_global_batches() * self.batch_size)

    def __repr__(self) -> str:
        return (
            f"DeviceBatches({self.name}, n={len(self.x)}, "
            f"batch_size={self.batch_size}, shuffle={self.shuffle}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, batches={len(self)})"
        )
