"""IDX parser and MNIST / Fashion-MNIST loading (generated fixtures + real MNIST if present)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torchgloro._errors import DatasetError
from torchgloro.data import _idx, get_dataset
from torchgloro.data._idx import read_idx

REAL_MNIST = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist").resolve()


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))
    return path


def make_mnist(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_gz(folder / name, idx_bytes(arr))
    return arrays


def patch_md5s(monkeypatch, name: str, folder: Path) -> None:
    """Point the registry's MD5s at the fixture files (the real ones would not match)."""
    res = dict(_idx.RESOURCES[name])
    for role, r in res.items():
        md5 = hashlib.md5((folder / r.filename).read_bytes()).hexdigest()
        res[role] = dataclasses.replace(r, md5=md5)
    monkeypatch.setitem(_idx.RESOURCES, name, res)


def test_read_idx_good(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write_gz(tmp_path / "a.gz", idx_bytes(arr))
    out = read_idx(p, expect_dtype=0x08, expect_shape=(None, 3, 4))
    np.testing.assert_array_equal(out, arr)
    # other dtypes are decoded big-endian
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    p2 = tmp_path / "f.idx"
    p2.write_bytes(idx_bytes(f, code=0x0D))
    np.testing.assert_array_equal(read_idx(p2), f)


def test_read_idx_wrong_magic(tmp_path):
    payload = bytearray(idx_bytes(np.zeros((2, 3), np.uint8)))
    payload[0] = 1
    p = write_gz(tmp_path / "bad-magic.gz", bytes(payload))
    with pytest.raises(DatasetError, match=r"bad-magic\.gz.*magic"):
        read_idx(p)
    p = write_gz(tmp_path / "int32.gz", idx_bytes(np.zeros((2, 3), np.int32), code=0x0C))
    with pytest.raises(DatasetError, match=r"int32\.gz.*type code"):
        read_idx(p, expect_dtype=0x08)


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100)))
    p = tmp_path / "trunc.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"trunc\.gz"):
        read_idx(p)


def test_read_idx_wrong_shape_and_size(tmp_path):
    p = write_gz(tmp_path / "shape.gz", idx_bytes(np.zeros((4, 27, 28), np.uint8)))
    with pytest.raises(DatasetError, match=r"shape\.gz.*shape"):
        read_idx(p, expect_shape=(None, 28, 28))
    with pytest.raises(DatasetError, match=r"shape\.gz.*shape"):
        read_idx(p, expect_shape=(None,))
    # payload shorter than the header's dimensions promise
    short = idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-5]
    p = write_gz(tmp_path / "short.gz", short)
    with pytest.raises(DatasetError, match=r"short\.gz.*payload"):
        read_idx(p)


@pytest.mark.parametrize("layout", ["flat", "subdir"])
def test_mnist_fixture_both_layouts(tmp_path, monkeypatch, layout):
    folder = tmp_path / "mnist" if layout == "subdir" else tmp_path
    arrays = make_mnist(folder)
    patch_md5s(monkeypatch, "mnist", folder)
    tr = get_dataset("mnist", "train", root=tmp_path)
    te = get_dataset("mnist", "test", root=tmp_path)
    assert tr.x.shape == (12, 1, 28, 28) and tr.x.dtype == torch.float32
    assert te.x.shape == (5, 1, 28, 28) and te.y.dtype == torch.int64
    expected = arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255
    np.testing.assert_allclose(tr.x[:, 0].numpy(), expected)
    np.testing.assert_array_equal(tr.y.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    assert tr.info.in_shape == (1, 28, 28) and tr.info.num_classes == 10
    assert tr.info.default_epsilon == 0.3


def test_mnist_wrong_md5_names_file(tmp_path):
    make_mnist(tmp_path)  # real MD5s in the registry will not match
    with pytest.raises(DatasetError) as ei:
        get_dataset("mnist", "train", root=tmp_path)
    msg = str(ei.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert hashlib.md5((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest() in msg
    assert "delete it and download it again" in msg  # an unknown file: corrupt or foreign


def test_fashion_missing_names_paths_and_hint(tmp_path):
    with pytest.raises(DatasetError) as ei:
        get_dataset("fashion-mnist", "test", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz") in msg
    assert "download=True" in msg and "--data-dir" in msg


def test_fashion_loads_with_patched_md5(tmp_path, monkeypatch):
    make_mnist(tmp_path / "fashion-mnist", seed=3)
    patch_md5s(monkeypatch, "fashion-mnist", tmp_path / "fashion-mnist")
    te = get_dataset("fashion-mnist", "test", root=tmp_path)
    assert len(te) == 5 and te.info.classes[9] == "Ankle boot"


def test_real_mnist():
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {REAL_MNIST}")
    tr = get_dataset("mnist", "train", root=REAL_MNIST)  # verifies the published MD5s
    te = get_dataset("mnist", "test", root=REAL_MNIST)
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert len(te.y) == 10000
    counts = torch.bincount(tr.y, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    assert abs(float(tr.x.mean()) - 0.1307) < 1e-3


def test_fashion_on_mnist_files_names_them_and_keeps_them(tmp_path, monkeypatch):
    # The fixture files stand in for MNIST's: their MD5s are registered as MNIST's.
    make_mnist(tmp_path)
    patch_md5s(monkeypatch, "mnist", tmp_path)
    with pytest.raises(DatasetError) as ei:
        get_dataset("fashion-mnist", "train", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "valid copy of mnist's train-images-idx3-ubyte.gz" in msg
    assert "not fashion-mnist's train-images-idx3-ubyte.gz" in msg
    assert "do not delete it" in msg and "download it again" not in msg
    assert f"move mnist's files to {tmp_path / 'mnist'}/" in msg
    assert f"put fashion-mnist's in {tmp_path / 'fashion-mnist'}/" in msg
    assert (tmp_path / "train-images-idx3-ubyte.gz").is_file()

    # Following the advice works: one folder per dataset under the same root.
    (tmp_path / "mnist").mkdir()
    for f in list(tmp_path.glob("*.gz")):
        f.rename(tmp_path / "mnist" / f.name)
    make_mnist(tmp_path / "fashion-mnist", seed=3)
    patch_md5s(monkeypatch, "fashion-mnist", tmp_path / "fashion-mnist")
    assert len(get_dataset("mnist", "train", root=tmp_path)) == 12
    assert get_dataset("fashion-mnist", "train", root=tmp_path).info.name == "fashion-mnist"

    # root pointing at MNIST's own folder: the advice is to pass its parent.
    with pytest.raises(DatasetError) as ei:
        get_dataset("fashion-mnist", "test", root=tmp_path / "mnist")
    msg = str(ei.value)
    assert "valid copy of mnist's t10k-images-idx3-ubyte.gz" in msg
    assert f"in {tmp_path / 'fashion-mnist'}/ and pass root={tmp_path} " in msg


def test_mnist_file_under_another_name_says_rename(tmp_path, monkeypatch):
    make_mnist(tmp_path)
    patch_md5s(monkeypatch, "mnist", tmp_path)
    train = tmp_path / "train-images-idx3-ubyte.gz"
    test = tmp_path / "t10k-images-idx3-ubyte.gz"
    train.write_bytes(test.read_bytes())  # the test images under the train name
    with pytest.raises(DatasetError) as ei:
        get_dataset("mnist", "train", root=tmp_path)
    msg = str(ei.value)
    assert "valid copy of mnist's t10k-images-idx3-ubyte.gz" in msg
    assert "not mnist's train-images-idx3-ubyte.gz" in msg
    assert "Rename it back to t10k-images-idx3-ubyte.gz" in msg


def test_fashion_on_real_mnist_files():
    if not (REAL_MNIST / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {REAL_MNIST}")
    with pytest.raises(DatasetError) as ei:  # the real, unpatched registry MD5s
        get_dataset("fashion-mnist", "test", root=REAL_MNIST)
    msg = str(ei.value)
    assert "valid copy of mnist's t10k-images-idx3-ubyte.gz" in msg
    assert "not fashion-mnist's t10k-images-idx3-ubyte.gz" in msg
    assert f"pass root={REAL_MNIST.parent} " in msg and "download it again" not in msg


def write_raw(folder: Path, arrays: dict) -> None:
    """The fixture arrays as uncompressed IDX files (``gunzip``-ed names, no ``.gz``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (folder / name.removesuffix(".gz")).write_bytes(idx_bytes(arr))


@pytest.mark.parametrize("layout", ["flat", "subdir"])
def test_mnist_uncompressed_files_load(tmp_path, monkeypatch, layout):
    folder = tmp_path / "mnist" if layout == "subdir" else tmp_path
    arrays = make_mnist(tmp_path / "made")
    write_raw(folder, arrays)
    monkeypatch.setattr(_idx, "COUNTS", {"train": 12, "test": 5})
    tr = get_dataset("mnist", "train", root=tmp_path)
    te = get_dataset("mnist", "test", root=tmp_path)
    np.testing.assert_allclose(
        tr.x[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(tr.y.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(te.y.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert te.x.shape == (5, 1, 28, 28)


def test_mnist_uncompressed_files_are_checked(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path / "made")
    write_raw(tmp_path, arrays)
    # the real image counts (60,000 / 10,000) are checked: 12 images is not MNIST
    with pytest.raises(DatasetError) as ei:
        get_dataset("mnist", "train", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "train-images-idx3-ubyte") in msg
    assert "12 entries, but mnist's train split has 60000" in msg
    monkeypatch.setattr(_idx, "COUNTS", {"train": 12, "test": 5})
    # a truncated (partly gunzipped) file fails the size check
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte: IDX payload"):
        get_dataset("mnist", "test", root=tmp_path)
    # a labels file in place of the images fails the header check
    raw.write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte: IDX shape \(5,\)"):
        get_dataset("mnist", "test", root=tmp_path)


def test_mnist_gz_preferred_to_uncompressed(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path)
    patch_md5s(monkeypatch, "mnist", tmp_path)
    write_raw(tmp_path, make_mnist(tmp_path / "other", seed=7))  # different content, no .gz
    tr = get_dataset("mnist", "train", root=tmp_path)
    np.testing.assert_array_equal(tr.y.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    # with no file at all, the message says the uncompressed name is accepted too
    with pytest.raises(DatasetError, match=r"or the same uncompressed, without \.gz"):
        get_dataset("mnist", "train", root=tmp_path / "empty")


def test_real_mnist_uncompressed(tmp_path):
    src = REAL_MNIST / "t10k-images-idx3-ubyte.gz"
    if not src.is_file():
        pytest.skip(f"real MNIST not found at {REAL_MNIST}")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((REAL_MNIST / f"{name}.gz").read_bytes()))
    te = get_dataset("mnist", "test", root=tmp_path)  # the real counts, unpatched
    ref = get_dataset("mnist", "test", root=REAL_MNIST)
    assert torch.equal(te.x, ref.x) and torch.equal(te.y, ref.y)
