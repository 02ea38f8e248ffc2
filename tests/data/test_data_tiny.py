"""Tiny-ImageNet from a generated zip / folder, and its .npy cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torchgloro._errors import DatasetError
from torchgloro.data import _tiny, get_dataset

WNIDS = ["n01443537", "n02099601"]


def jpeg(color: tuple[int, int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tiny_files() -> dict[str, bytes]:
    files = {"wnids.txt": ("\n".join(WNIDS) + "\n").encode()}
    for c, w in enumerate(WNIDS):
        for i in range(3):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = jpeg((200 * c, 40 * i, 100))
        files[f"train/{w}/{w}_boxes.txt"] = b""
    ann = []
    for i, w in enumerate([WNIDS[1], WNIDS[0]]):
        files[f"val/images/val_{i}.JPEG"] = jpeg((10, 20 * i, 30), mode="L" if i else "RGB")
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    return files


def make_zip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in tiny_files().items():
            zf.writestr(f"tiny-imagenet-200/{rel}", data)


def make_folder(root: Path) -> None:
    for rel, data in tiny_files().items():
        p = root / "tiny-imagenet-200" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def patch_md5(monkeypatch, zp: Path) -> None:
    r = _tiny.RESOURCES["tiny-imagenet"]
    md5 = hashlib.md5(zp.read_bytes()).hexdigest()
    monkeypatch.setitem(_tiny.RESOURCES, "tiny-imagenet", dataclasses.replace(r, md5=md5))


def test_tiny_from_zip_then_cache(tmp_path, monkeypatch):
    zp = tmp_path / "tiny-imagenet" / "tiny-imagenet-200.zip"
    make_zip(zp)
    patch_md5(monkeypatch, zp)
    tr = get_dataset("tiny-imagenet", "train", root=tmp_path)
    assert tr.x.shape == (6, 3, 64, 64) and tr.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert tr.info.classes == tuple(WNIDS) and tr.info.in_shape == (3, 64, 64)
    assert float(tr.x.min()) >= 0.0 and float(tr.x.max()) <= 1.0
    # JPEG colour roughly preserved: class 1 images are red (200, *, 100)
    assert abs(float(tr.x[3, 0].mean()) - 200 / 255) < 0.03
    cache = tmp_path / "tiny-imagenet" / "tiny-imagenet-200-cache"
    assert (cache / "train_x.npy").is_file() and (cache / "train_y.npy").is_file()
    assert np.load(cache / "train_x.npy").dtype == np.uint8

    te = get_dataset("tiny-imagenet", "test", root=tmp_path)
    assert te.y.tolist() == [1, 0] and te.x.shape == (2, 3, 64, 64)
    # grayscale JPEG was converted to RGB: channels equal
    assert float((te.x[1, 0] - te.x[1, 2]).abs().max()) < 0.02

    # second load reads the cache: prove it by making the zip unusable and the cache marked
    zp.write_bytes(b"garbage")
    x = np.load(cache / "train_x.npy")
    x[0] = 7
    np.save(cache / "train_x.npy", x)
    again = get_dataset("tiny-imagenet", "train", root=tmp_path)
    assert again.x.shape == (6, 3, 64, 64)
    assert float(again.x[0].max()) == pytest.approx(7 / 255)
    zp.unlink()  # the cache alone is enough
    assert len(get_dataset("tiny-imagenet", "test", root=tmp_path)) == 2


def test_tiny_extracted_folder(tmp_path):
    make_folder(tmp_path)
    te = get_dataset("tiny-imagenet", "test", root=tmp_path)
    assert te.y.tolist() == [1, 0]
    assert (tmp_path / "tiny-imagenet-200-cache" / "test_x.npy").is_file()


def test_tiny_missing_and_corrupt(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="tiny-imagenet-200.zip.*download=True"):
        get_dataset("tiny-imagenet", "train", root=tmp_path)
    make_folder(tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=f"{WNIDS[0]}_1.JPEG"):
        get_dataset("tiny-imagenet", "train", root=tmp_path)
    assert not (tmp_path / "tiny-imagenet-200-cache" / "train_x.npy").exists()
