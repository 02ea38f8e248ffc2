"""Datasets and input pipelines for torchgloro.

* :func:`get_dataset` loads a split of ``mnist``, ``fashion-mnist``, ``cifar10``,
  ``cifar100``, ``tiny-imagenet``, ``digits`` (bundled, offline) or ``npz:PATH`` into a
  :class:`Split` (``x``: ``(N, C, H, W)`` float32 in ``[0, 1]``, ``y``: int64).
* :func:`resolve_root`: explicit root > ``$TORCHGLORO_DATA`` > ``~/.cache/torchgloro``.
* :class:`DeviceBatches` batches a split held as one tensor on the device (DDP aware);
  :func:`as_tensors` reads ``(x, y)`` out of a Split, a pair, a TensorDataset or a Dataset.
* :class:`Augment` is the paper's Appendix B augmentation, batched with kornia.

See ``docs/data.md`` for where files live and how to download them.
"""

from ._augment import Augment
from ._pipeline import DeviceBatches, as_tensors
from ._registry import get_dataset, list_datasets, resolve_root
from ._types import DatasetInfo, Split

__all__ = [
    "DatasetInfo",
    "Split",
    "get_dataset",
    "list_datasets",
    "resolve_root",
    "DeviceBatches",
    "as_tensors",
    "Augment",
]
