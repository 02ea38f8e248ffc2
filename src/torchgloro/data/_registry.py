"""The dataset registry: name -> loader, root resolution, :func:`get_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torchgloro._errors import GloroInputError

from ._cifar import load_cifar
from ._digits import load_digits
from ._idx import load_mnist_like
from ._npz import load_npz
from ._tiny import load_tiny_imagenet
from ._types import Split

__all__ = ["get_dataset", "list_datasets", "resolve_root", "ENV_VAR", "SPLITS"]

ENV_VAR = "TORCHGLORO_DATA"
SPLITS = ("train", "test")

# A loader takes (root, split, download) and returns a Split.
Loader = Callable[[Path, str, bool], Split]


@dataclass(frozen=True)
class _Spec:
    loader: Loader
    needs_root: bool = True  # digits is bundled with scikit-learn: no root


_REGISTRY: dict[str, _Spec] = {
    "mnist": _Spec(partial(load_mnist_like, "mnist")),
    "fashion-mnist": _Spec(partial(load_mnist_like, "fashion-mnist")),
    "cifar10": _Spec(partial(load_cifar, "cifar10")),
    "cifar100": _Spec(partial(load_cifar, "cifar100")),
    "tiny-imagenet": _Spec(partial(load_tiny_imagenet, "tiny-imagenet")),
    "digits": _Spec(partial(load_digits, "digits"), needs_root=False),
}

# "<prefix>:<argument>" names, e.g. "npz:path/to/file.npz".
_PREFIXED: dict[str, Callable[[str, Path | None, str, bool], Split]] = {"npz": load_npz}

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tiny_imagenet": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet",
}


def list_datasets() -> list[str]:
    """Registered dataset names (``npz:PATH`` is accepted too, for your own data)."""
    return sorted(_REGISTRY)


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Data root: explicit ``root`` > ``$TORCHGLORO_DATA`` > ``~/.cache/torchgloro``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/torchgloro").expanduser()


def get_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Split:
    """Load ``split`` (``"train"`` or ``"test"``) of dataset ``name`` into memory.

    ``name`` is one of :func:`list_datasets` or ``"npz:PATH"``. Files are looked up under
    :func:`resolve_root` (``root/<name>/`` or ``root/`` itself); with ``download=True``
    missing files are fetched from the official mirrors and MD5-checked.
    """
    if not isinstance(name, str) or not name:
        raise GloroInputError(f"dataset name must be a non-empty string, got {name!r}")
    if split not in SPLITS:
        raise GloroInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    prefix, sep, arg = name.partition(":")
    if sep and prefix.lower() in _PREFIXED:
        return _PREFIXED[prefix.lower()](arg, resolve_root(root), split, download)
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    spec = _REGISTRY.get(key)
    if spec is None:
        known = ", ".join(list_datasets())
        raise GloroInputError(f"unknown dataset {name!r}; known: {known}, or npz:PATH")
    return spec.loader(resolve_root(root) if spec.needs_root else None, split, download)
