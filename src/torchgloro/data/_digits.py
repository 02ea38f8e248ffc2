"""scikit-learn's bundled 8x8 digits: the offline default dataset (never downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ._types import DatasetInfo, Split

__all__ = ["load_digits", "DIGITS", "N_TEST"]

N_TEST = 300
# Not in the GloRo paper: 0.3, MNIST's radius, on pixels scaled to [0, 1]. The 8x8 images
# have 64 pixels instead of 784, so 0.3 is relatively larger than on MNIST; it is a
# smoke-test setting, not a benchmark.
DIGITS = DatasetInfo("digits", tuple(str(i) for i in range(10)), (1, 8, 8), 0.3)


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = np.asarray(d.images, dtype=np.float32) / 16.0
    labels = np.asarray(d.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(name: str, root: Path | None, split: str, download: bool) -> Split:
    """1,797 images; a fixed permutation (``RandomState(0)``) puts 1,497 in train, 300 in test."""
    images, labels = _raw()
    perm = np.random.RandomState(0).permutation(len(labels))
    idx = perm[:-N_TEST] if split == "train" else perm[-N_TEST:]
    x = torch.from_numpy(np.ascontiguousarray(images[idx][:, None]))
    return Split(x.clamp_(0.0, 1.0), torch.from_numpy(labels[idx]), DIGITS)
