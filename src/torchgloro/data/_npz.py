"""User data in a NumPy ``.npz`` with ``train_x``, ``train_y``, ``test_x``, ``test_y``.

Images are uint8 (0..255) or float already in ``[0, 1]``, laid out ``(N, H, W, C)``,
``(N, C, H, W)`` (C = 1 or 3, detected) or ``(N, H, W)`` (one channel). Labels are
integers ``0 .. C-1`` where C = 1 + the largest label in either split (a class with no
image, or a test label the training split lacks, draws a warning; more than
:data:`MAX_CLASSES` classes is an error). Both splits need at least one image.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from torchgloro._errors import DatasetError, GloroInputError

from ._types import DatasetInfo, Split

__all__ = ["load_npz", "to_nchw", "MAX_CLASSES"]

KEYS = ("train_x", "train_y", "test_x", "test_y")
# Above this many classes (1 + the largest label) the labels are almost surely not
# 0..C-1: the model's output and the (C, C) matrices built in training would not fit.
MAX_CLASSES = 100_000


def to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """Return ``x`` as ``(N, C, H, W)``; the channel axis is the one of size 1 or 3."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DatasetError(
            f"{source}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}"
        )
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if last and not first:
        return x.transpose(0, 3, 1, 2)
    if first and not last:
        return x
    if first and last:
        raise DatasetError(
            f"{source}: ambiguous layout {x.shape}: both axis 1 and axis 3 could be channels"
        )
    raise DatasetError(
        f"{source}: cannot find the channel axis in {x.shape}: axis 1 or 3 must have size 1 or 3"
    )


def _images(x: np.ndarray, source: str) -> torch.Tensor:
    x = to_nchw(x, source)
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            raise DatasetError(f"{source}: images contain NaN or Inf")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(
                f"{source}: float images must already be scaled to [0, 1] "
                f"(found min {lo:g}, max {hi:g}); divide by 255 or store uint8"
            )
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise DatasetError(
        f"{source}: images have dtype {x.dtype}; store uint8 (0..255) or float in [0, 1]"
    )


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{source}: labels must be (N,), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DatasetError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
        raise DatasetError(f"{source}: label {int(y.max())} is too large; labels must be 0..C-1")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DatasetError(f"{source}: negative label {int(y.min())}; labels must be 0..C-1")
    return y


def _num_classes(ys: dict[str, np.ndarray], path: Path) -> int:
    """1 + the largest label of either split; :class:`DatasetError` above :data:`MAX_CLASSES`."""
    num_classes = 1 + max((int(v.max()) for v in ys.values() if v.size), default=0)
    if num_classes > MAX_CLASSES:
        distinct = np.union1d(ys["train_y"], ys["test_y"]).size
        raise DatasetError(
            f"{path}: the largest label is {num_classes - 1}, which would make "
            f"{num_classes} classes (more than {MAX_CLASSES:,}), but only {distinct} distinct "
            "label(s) occur; relabel the data as 0..C-1 (e.g. "
            "np.unique(y, return_inverse=True)[1] over both splits together)"
        )
    return num_classes


def _warn_label_gaps(ys: dict[str, np.ndarray], num_classes: int, path: Path) -> None:
    """Warns when the class count looks inflated by a stray label: classes below the largest
    label that no image has, or test labels the training split never shows."""
    train, test = np.unique(ys["train_y"]), np.unique(ys["test_y"])
    present = np.union1d(train, test)  # sorted, distinct, all < num_classes
    n_empty = num_classes - present.size
    if n_empty:
        # The first 8 gaps lie below present.size + 8: no range(num_classes) is built.
        empty = np.setdiff1d(np.arange(min(num_classes, present.size + 8)), present)[:8]
        shown = ", ".join(map(str, empty.tolist())) + (", …" if n_empty > 8 else "")
        warnings.warn(
            f"{path}: {num_classes} classes (1 + the largest label, {num_classes - 1}), but "
            f"{n_empty} of them have no image ({shown}). A stray label inflates the model's "
            f"output; relabel the data as 0..C-1 if that is not intended.",
            stacklevel=3,
        )
    unseen = np.setdiff1d(test, train)
    if unseen.size and train.size:
        warnings.warn(
            f"{path}: test label(s) {', '.join(map(str, unseen[:8].tolist()))} never occur in "
            f"train_y; a model trained on this data cannot predict them.",
            stacklevel=3,
        )


def _shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in the npz, from the headers only (no data read)."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0  # 2.0 and 3.0 share a layout
                )
                shape, _, dtype = read(f)
            need, held = math.prod(shape) * dtype.itemsize, zf.getinfo(name).file_size
            if need > held:  # numpy would allocate what the header says before reading
                raise DatasetError(
                    f"{path}: the header of {name[: -len('.npy')]} says shape {tuple(shape)} "
                    f"({need:,} bytes), but the file holds {held:,} bytes for it: the file is "
                    f"corrupt or crafted. Re-create it with numpy.savez."
                )
            out[name[: -len(".npy")]] = (tuple(shape), dtype)
    return out


def load_npz(path_str: str, root: Path | None, split: str, download: bool) -> Split:
    """Load ``split`` from the ``.npz`` at ``path_str`` (``root`` and ``download`` unused)."""
    if not path_str:
        raise GloroInputError("dataset 'npz:PATH' needs a path, e.g. 'npz:data/mine.npz'")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (dataset 'npz:{path_str}')")
    other = "test" if split == "train" else "train"
    try:
        shapes = _shapes(path)
        missing = [k for k in KEYS if k not in shapes]
        if missing:
            raise DatasetError(
                f"{path}: missing array(s) {', '.join(missing)}; "
                f"an npz dataset needs {', '.join(KEYS)}"
            )
        for s in (split, other):
            nx, ny = shapes[f"{s}_x"][0], shapes[f"{s}_y"][0]
            if not nx or not ny or nx[0] != ny[0]:
                raise DatasetError(
                    f"{path}: {s}_x has shape {nx} but {s}_y has shape {ny}: "
                    "need one label per image"
                )
            if nx[0] == 0:
                raise DatasetError(
                    f"{path}: {s}_x has 0 images; both the train and the test split need at "
                    "least one image (hold out some training images as test_x/test_y if "
                    "you have no test set)"
                )
        other_shape = to_nchw(
            np.empty((0, *shapes[f"{other}_x"][0][1:]), dtype=np.uint8), f"{path}:{other}_x"
        ).shape
        with np.load(path, allow_pickle=False) as z:
            ys = {k: _labels(z[k], f"{path}:{k}") for k in ("train_y", "test_y")}
            num_classes = _num_classes(ys, path)  # before reading the images
            xr = z[f"{split}_x"]
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz without pickles ({e})") from e
    x = _images(xr, f"{path}:{split}_x")
    y = ys[f"{split}_y"]
    if tuple(x.shape[1:]) != tuple(other_shape[1:]):
        raise DatasetError(
            f"{path}: train and test images differ in shape ({tuple(x.shape[1:])} vs "
            f"{tuple(other_shape[1:])} as (C,H,W))"
        )
    _warn_label_gaps(ys, num_classes, path)
    c, h, w = (int(s) for s in x.shape[1:])
    # 36/255 (the paper's CIFAR radius) for colour images, 0.3 (MNIST's) otherwise.
    eps = 36 / 255 if c == 3 else 0.3
    info = DatasetInfo("npz", tuple(str(i) for i in range(num_classes)), (c, h, w), eps)
    return Split(x, torch.from_numpy(y), info)
