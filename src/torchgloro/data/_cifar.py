"""CIFAR-10 / CIFAR-100 from the official "python version" tarball or extracted folder,
or from an npz of the same images (``cifar10.npz``: ``train_x``, ``train_y``, ``test_x``,
``test_y``, see :mod:`torchgloro.data._npz`).

The batches are pickles. They are read with :class:`RestrictedUnpickler`, which only
resolves the handful of NumPy globals the format needs, so a tampered file cannot run
code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgloro._errors import DatasetError

from ._download import Resource, locate, verify_md5
from ._npz import load_npz
from ._types import DatasetInfo, Split

__all__ = ["RestrictedUnpickler", "restricted_loads", "load_cifar", "RESOURCES", "CIFAR10"]


def _numpy_global(module: str, name: str) -> Callable[[], Any]:
    def get() -> Any:
        import importlib

        try:
            mod = importlib.import_module(f"numpy._core.{module}")  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            mod = importlib.import_module(f"numpy.core.{module}")
        return getattr(mod, name)

    return get


def _codecs_encode() -> Any:
    import _codecs

    return _codecs.encode


# (module, name) -> resolver. Nothing else may be looked up while unpickling.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_global("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_global("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): _numpy_global("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): _numpy_global("multiarray", "scalar"),
    # pickle protocol 5 arrays (numpy >= 1.16): frombuffer + reshape, no code execution
    ("numpy.core.numeric", "_frombuffer"): _numpy_global("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _numpy_global("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
    # Python 3 protocol-2 re-pickles write b"" as __builtin__.bytes()
    ("__builtin__", "bytes"): lambda: bytes,
    ("builtins", "bytes"): lambda: bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only allows the globals used by the CIFAR pickles."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        get = _ALLOWED.get((module, name))
        if get is None:
            raise DatasetError(
                f"refusing to unpickle {module}.{name} from {self.source}: "
                "not part of the CIFAR format"
            )
        return get()


def restricted_loads(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; errors name ``source``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{source}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class _Variant:
    info: DatasetInfo
    resource: Resource
    folder: str  # top-level folder inside the tarball
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes


_C10 = "airplane automobile bird cat deer dog frog horse ship truck".split()
_C100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach "
    "couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster "
    "house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

EPS_CIFAR = 36 / 255
CIFAR10 = DatasetInfo("cifar10", tuple(_C10), (3, 32, 32), EPS_CIFAR, True)
CIFAR100 = DatasetInfo("cifar100", tuple(_C100), (3, 32, 32), EPS_CIFAR, True)

# dataset name -> variant; looked up at call time (tests may patch entries).
RESOURCES: dict[str, _Variant] = {
    "cifar10": _Variant(
        CIFAR10,
        Resource(
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        ),
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
    ),
    "cifar100": _Variant(
        CIFAR100,
        Resource(
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        ),
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
    ),
}


def _decode_batch(obj: Any, v: _Variant, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a dict, got {type(obj).__name__}")
    data, labels = obj.get(b"data"), obj.get(v.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{source}: b'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{source}: b'data' has shape {data.shape}, expected (N, 3072)")
    if labels is None:
        raise DatasetError(f"{source}: missing {v.label_key!r}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{source}: {v.label_key!r} is not a list of integers") from e
    if y.shape[0] != data.shape[0]:
        raise DatasetError(f"{source}: {data.shape[0]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= v.info.num_classes):
        raise DatasetError(f"{source}: labels outside 0..{v.info.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), y


def _find_folder(root: Path, name: str, v: _Variant) -> Path | None:
    for d in (root / name / v.folder, root / v.folder, root / name, root):
        if all((d / m).is_file() for m in v.train + v.test):
            return d
    return None


def _read_from_tar(tar_path: Path, v: _Variant, members: tuple[str, ...]) -> dict[str, bytes]:
    wanted = {f"{v.folder}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, "r:gz") as tf:
            for info in tf:
                m = wanted.get(info.name.lstrip("./"))
                if m is not None and info.isfile():
                    f = tf.extractfile(info)
                    assert f is not None
                    found[m] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{tar_path}: corrupt or truncated tarball ({e})") from e
    missing = [f"{v.folder}/{m}" for m in members if m not in found]
    if missing:
        raise DatasetError(f"{tar_path}: missing member(s) {', '.join(missing)}")
    return found


def _find_npz(root: Path, name: str) -> Path | None:
    """``root`` itself when it is an ``.npz`` file, else the first ``<name>.npz`` in
    ``root/name``, ``root``."""
    if root.is_file():
        if root.suffix == ".npz":
            return root
        raise DatasetError(
            f"{root}: the data root (--data-dir) is a file but not an .npz; pass the folder "
            f"that holds {name}.npz, the official tarball or its extracted folder, or an .npz"
        )
    for p in (root / name / f"{name}.npz", root / f"{name}.npz"):
        if p.is_file():
            return p
    return None


def _load_npz(path: Path, v: _Variant, split: str) -> Split:
    """``split`` of the npz at ``path``, checked to be ``v``'s image shape and classes."""
    s = load_npz(str(path), None, split, False)
    info = v.info
    if tuple(s.x.shape[1:]) != info.in_shape:
        raise DatasetError(
            f"{path}: images of shape {tuple(s.x.shape[1:])} (C,H,W), but {info.name} has "
            f"{info.in_shape}: this npz does not hold {info.name}"
        )
    if s.info.num_classes > info.num_classes:
        raise DatasetError(
            f"{path}: labels up to {s.info.num_classes - 1}, but {info.name} has "
            f"{info.num_classes} classes (0..{info.num_classes - 1}): this npz does not hold "
            f"{info.name}"
        )
    return Split(s.x, s.y, info)


def _missing_message(e: DatasetError, root: Path, name: str, v: _Variant) -> str:
    return (
        f"{e} (or the extracted folder {root / name / v.folder}). If you hold {name} as an "
        f"npz (train_x, train_y, test_x, test_y; uint8 images, e.g. assembled with "
        f"numpy.savez), put it at DIR/{name}.npz and pass --data-dir DIR (Python: "
        f"root=DIR), or pass --data-dir PATH/TO/{name}.npz"
    )


def load_cifar(name: str, root: Path, split: str, download: bool) -> Split:
    """Load ``split`` of ``cifar10``/``cifar100``.

    Looked up in order: the extracted folder, ``<name>.npz`` (or ``root`` itself when it is a
    file), then the tarball (downloaded when ``download``).
    """
    v = RESOURCES[name]
    members = v.train if split == "train" else v.test
    folder = _find_folder(root, name, v)
    npz = None if folder is not None else _find_npz(root, name)
    if npz is not None:
        return _load_npz(npz, v, split)
    if folder is not None:
        blobs = {}
        for m in members:
            try:
                blobs[m] = (folder / m).read_bytes()
            except OSError as e:
                raise DatasetError(f"{folder / m}: cannot read ({e})") from e
        sources = {m: str(folder / m) for m in members}
    else:
        try:
            tar_path = locate(v.resource, [root / name, root], download, check_md5=False)
        except DatasetError as e:
            raise DatasetError(_missing_message(e, root, name, v)) from None
        verify_md5(tar_path, v.resource.md5)
        blobs = _read_from_tar(tar_path, v, members)
        sources = {m: f"{tar_path}:{v.folder}/{m}" for m in members}
    xs, ys = [], []
    for m in members:
        x, y = _decode_batch(restricted_loads(blobs[m], sources[m]), v, sources[m])
        xs.append(x)
        ys.append(y)
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    return Split(x, torch.from_numpy(np.concatenate(ys)), v.info)
