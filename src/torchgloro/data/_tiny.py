"""Tiny-ImageNet-200 from the official zip or its extracted folder, with a ``.npy`` cache.

The first load of a split decodes every JPEG with Pillow (RGB) and writes
``<cache>/<split>_x.npy`` (uint8, ``(N, 3, 64, 64)``) and ``<split>_y.npy`` (int64);
later loads read the cache only. The cache folder is ``tiny-imagenet-200-cache`` beside
the zip/folder (delete it to force a re-decode).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from torchgloro._errors import DatasetError

from ._download import Resource, locate, missing_hint, verify_md5
from ._types import DatasetInfo, Split

__all__ = ["load_tiny_imagenet", "RESOURCES", "TOP", "CACHE_DIR"]

TOP = "tiny-imagenet-200"
CACHE_DIR = "tiny-imagenet-200-cache"
RESOURCES: dict[str, Resource] = {
    "tiny-imagenet": Resource(
        "tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de",
        ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
    )
}
EPS_TINY = 36 / 255


class _Source:
    """Uniform read access to the files of the extracted folder or of the zip."""

    def __init__(self, folder: Path | None = None, zip_path: Path | None = None) -> None:
        self.folder, self.zip_path = folder, zip_path
        self._zf = zipfile.ZipFile(zip_path) if zip_path is not None else None
        self._names = set(self._zf.namelist()) if self._zf is not None else set()

    def where(self, rel: str) -> str:
        if self._zf is not None:
            return f"{self.zip_path}:{TOP}/{rel}"
        return str(self.folder / rel)

    def read(self, rel: str) -> bytes:
        try:
            if self._zf is not None:
                return self._zf.read(f"{TOP}/{rel}")
            return (self.folder / rel).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{self.where(rel)}: missing or unreadable ({e})") from e

    def list_dir(self, rel: str) -> list[str]:
        """File names directly inside ``rel`` (sorted)."""
        if self._zf is not None:
            prefix = f"{TOP}/{rel.rstrip('/')}/"
            return sorted(
                n[len(prefix) :]
                for n in self._names
                if n.startswith(prefix) and "/" not in n[len(prefix) :] and n != prefix
            )
        d = self.folder / rel
        if not d.is_dir():
            raise DatasetError(f"{d}: missing folder")
        return sorted(p.name for p in d.iterdir() if p.is_file())

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()


def _decode(src: _Source, rel: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(src.read(rel))) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{src.where(rel)}: cannot decode image ({e})") from e
    if arr.shape != (64, 64, 3):
        raise DatasetError(f"{src.where(rel)}: image is {arr.shape[1]}x{arr.shape[0]}, not 64x64")
    return arr.transpose(2, 0, 1)


def _wnids(src: _Source) -> list[str]:
    wnids = [w.strip() for w in src.read("wnids.txt").decode().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{src.where('wnids.txt')}: empty or duplicate class ids")
    return wnids


def _items(src: _Source, split: str, wnids: list[str]) -> list[tuple[str, int]]:
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        return [
            (f"train/{w}/images/{f}", index[w])
            for w in wnids
            for f in src.list_dir(f"train/{w}/images")
            if f.lower().endswith((".jpeg", ".jpg"))
        ]
    items = []
    ann = "val/val_annotations.txt"
    for line_no, line in enumerate(src.read(ann).decode().splitlines(), 1):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetError(f"{src.where(ann)}:{line_no}: bad line {line!r}")
        items.append((f"val/images/{parts[0]}", index[parts[1]]))
    return items


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    xp, yp = cache / f"{split}_x.npy", cache / f"{split}_y.npy"
    if not (xp.is_file() and yp.is_file()):
        return None
    try:
        x = np.load(xp, allow_pickle=False)
        y = np.load(yp, allow_pickle=False)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable Tiny-ImageNet cache in {cache}: {e}", stacklevel=3)
        return None
    if x.dtype != np.uint8 or x.shape[1:] != (3, 64, 64) or y.shape != (x.shape[0],):
        warnings.warn(f"ignoring inconsistent Tiny-ImageNet cache in {cache}", stacklevel=3)
        return None
    return x, y


def _find(root: Path, download: bool) -> tuple[Callable[[], _Source], Path]:
    """Return (source factory, directory that holds the zip/folder)."""
    for d in (root / "tiny-imagenet", root):
        if (d / TOP / "wnids.txt").is_file():
            return (lambda d=d: _Source(folder=d / TOP)), d
    res = RESOURCES["tiny-imagenet"]
    try:
        zp = locate(res, [root / "tiny-imagenet", root], download, check_md5=False)
    except DatasetError:
        raise DatasetError(
            missing_hint([root / "tiny-imagenet" / res.filename, root / "tiny-imagenet" / TOP])
        ) from None

    def make() -> _Source:
        verify_md5(zp, res.md5)
        try:
            return _Source(zip_path=zp)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{zp}: corrupt zip ({e})") from e

    return make, zp.parent


def load_tiny_imagenet(name: str, root: Path, split: str, download: bool) -> Split:
    """Load ``train`` or ``test`` (the official val set) of Tiny-ImageNet-200."""
    cached = None
    for d in (root / "tiny-imagenet", root):  # a cache is enough, even without the zip
        cache = d / CACHE_DIR
        if (cache / "wnids.txt").is_file():
            cached = _load_cache(cache, split)
            if cached is not None:
                break
    if cached is not None:
        wnids = (cache / "wnids.txt").read_text().split()
        x, y = cached
    else:
        make, base = _find(root, download)
        cache = base / CACHE_DIR
        src = make()
        try:
            wnids = _wnids(src)
            items = _items(src, split, wnids)
            if not items:
                raise DatasetError(f"{src.where(split)}: no images found")
            from tqdm.auto import tqdm

            x = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
            for i, (rel, _) in enumerate(tqdm(items, desc=f"decoding {split}", disable=None)):
                x[i] = _decode(src, rel)
            y = np.array([c for _, c in items], dtype=np.int64)
        finally:
            src.close()
        try:
            cache.mkdir(exist_ok=True)
            _atomic_save(cache / f"{split}_y.npy", y)
            _atomic_save(cache / f"{split}_x.npy", x)
            (cache / "wnids.txt").write_text("\n".join(wnids) + "\n")
        except OSError as e:
            warnings.warn(f"could not write Tiny-ImageNet cache to {cache}: {e}", stacklevel=2)
    if y.size and (y.min() < 0 or y.max() >= len(wnids)):
        raise DatasetError(f"{cache}: labels outside 0..{len(wnids) - 1}; delete the cache")
    info = DatasetInfo("tiny-imagenet", tuple(wnids), (3, 64, 64), EPS_TINY, True)
    return Split(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y), info)
