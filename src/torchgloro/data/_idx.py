"""Strict IDX parser and the MNIST / Fashion-MNIST loaders."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from torchgloro._errors import DatasetError

from ._download import MISSING_HINT, Resource, fetch, verify_md5
from ._types import DatasetInfo, Split

__all__ = ["read_idx", "load_mnist_like", "MNIST", "FASHION_MNIST", "RESOURCES", "COUNTS"]

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(
    path: str | Path,
    *,
    expect_dtype: int | None = None,
    expect_shape: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Parse a gzip-compressed (``.gz``) or raw IDX file strictly.

    The magic number must be ``00 00 <type> <ndim>`` with a known type; with
    ``expect_dtype`` the type code must equal it, with ``expect_shape`` the dimensions must
    match (``None`` = any size). The payload must be exactly ``prod(dims) * itemsize``
    bytes. Any violation, or a truncated/corrupt gzip stream, raises :class:`DatasetError`
    naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 or zero1 or code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x}")
    if expect_dtype is not None and code != expect_dtype:
        raise DatasetError(
            f"{path}: IDX type code 0x{code:02x}, expected 0x{expect_dtype:02x} "
            f"(magic 0x{magic:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if expect_shape is not None:
        ok = len(dims) == len(expect_shape) and all(
            e is None or d == e for d, e in zip(dims, expect_shape, strict=False)
        )
        if not ok:
            want = tuple("N" if e is None else e for e in expect_shape)
            raise DatasetError(f"{path}: IDX shape {dims}, expected {want}")
    dtype = _IDX_DTYPES[code]
    n_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != n_bytes:
        raise DatasetError(
            f"{path}: IDX payload is {len(raw) - header} bytes, shape {dims} needs {n_bytes}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _resources(bases: tuple[str, ...], md5s: dict[str, str]) -> dict[str, Resource]:
    return {
        role: Resource(fname, md5s[role], tuple(b + fname for b in bases))
        for role, fname in _FILES.items()
    }


# dataset name -> {role -> Resource}; looked up at call time (tests may patch entries).
RESOURCES: dict[str, dict[str, Resource]] = {
    "mnist": _resources(
        _MNIST_URLS,
        {
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": _resources(
        _FASHION_URLS,
        {
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

MNIST = DatasetInfo("mnist", tuple(str(i) for i in range(10)), (1, 28, 28), 0.3)
# Fashion-MNIST is not in the GloRo paper: 0.3 mirrors MNIST (same input size and scale).
FASHION_MNIST = DatasetInfo(
    "fashion-mnist",
    (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    (1, 28, 28),
    0.3,
)
_INFOS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}
# Images per split, the same for MNIST and Fashion-MNIST: checked on uncompressed files,
# which the published (.gz) MD5s cannot verify.
COUNTS = {"train": 60_000, "test": 10_000}


def _find(res: Resource, dirs: Sequence[Path], download: bool) -> tuple[Path, bool]:
    """Return ``(path, verified)`` for ``res`` in the first of ``dirs`` that has it.

    In each directory the ``.gz`` file (MD5-checked, ``verified``) is preferred to the
    uncompressed one (the same name without ``.gz``, as ``gunzip`` leaves it). If neither
    is anywhere, the ``.gz`` is downloaded into ``dirs[0]`` when ``download`` is set.
    """
    for d in dirs:
        gz = Path(d) / res.filename
        if gz.is_file():
            verify_md5(gz, res.md5)
            return gz, True
        raw = gz.with_suffix("")
        if raw.is_file():
            return raw, False
    candidates = [Path(d) / res.filename for d in dirs]
    if not download:
        where = " or ".join(str(c) for c in candidates)
        raise DatasetError(
            f"not found: expected {where} (or the same uncompressed, without .gz); {MISSING_HINT}"
        )
    return fetch(res.urls, candidates[0], res.md5), True


def load_mnist_like(name: str, root: Path, split: str, download: bool) -> Split:
    """Load ``split`` of MNIST or Fashion-MNIST from ``root/<name>/`` or ``root/``.

    The published ``.gz`` files are verified by MD5. Uncompressed files (``gunzip``-ed,
    e.g. ``train-images-idx3-ubyte``) are accepted too when the ``.gz`` is absent; the
    published MD5s are for the ``.gz`` files, so these are verified by their IDX header
    (magic number, ``uint8``, 28x28 images), exact size and image count (:data:`COUNTS`)
    instead. That cannot tell MNIST from Fashion-MNIST, whose files share names and
    shapes: keep each dataset in its own folder.
    """
    info = _INFOS[name]
    res = RESOURCES[name]
    dirs = [root / name, root]
    img_path, img_ok = _find(res[f"{split}_images"], dirs, download)
    lbl_path, lbl_ok = _find(res[f"{split}_labels"], dirs, download)
    _, h, w = info.in_shape
    images = read_idx(img_path, expect_dtype=0x08, expect_shape=(None, h, w))
    labels = read_idx(lbl_path, expect_dtype=0x08, expect_shape=(None,))
    n = COUNTS[split]
    for path, arr, ok in ((img_path, images, img_ok), (lbl_path, labels, lbl_ok)):
        if not ok and arr.shape[0] != n:
            raise DatasetError(
                f"{path}: {arr.shape[0]} entries, but {name}'s {split} split has {n}; "
                f"the uncompressed file is not the published one (the .gz file, which is "
                "MD5-checked, is preferred when present)"
            )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= info.num_classes:
        raise DatasetError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x, y, info)
