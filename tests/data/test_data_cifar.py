"""CIFAR loading from generated pickles (folder and tarball) and the restricted unpickler."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from torchgloro._errors import DatasetError
from torchgloro.data import _cifar, get_dataset
from torchgloro.data._cifar import restricted_loads

N_PER_BATCH = 4


def batch(seed: int, n: int, label_key: bytes = b"labels", protocol: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"fake batch",
        label_key: [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(d, protocol=protocol)


def make_cifar10_folder(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    blobs = {f"data_batch_{i}": batch(i, N_PER_BATCH, protocol=2 + i % 3) for i in range(1, 6)}
    blobs["test_batch"] = batch(99, 3)
    blobs["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return blobs


def expected(blobs: dict[str, bytes], members: list[str], key: bytes = b"labels"):
    ds = [pickle.loads(blobs[m], encoding="bytes") for m in members]
    x = np.concatenate([d[b"data"] for d in ds]).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    y = np.concatenate([d[key] for d in ds])
    return x, y


def test_cifar10_extracted_folder(tmp_path):
    blobs = make_cifar10_folder(tmp_path / "cifar10" / "cifar-10-batches-py")
    tr = get_dataset("cifar10", "train", root=tmp_path)
    te = get_dataset("cifar10", "test", root=tmp_path)
    ex, ey = expected(blobs, [f"data_batch_{i}" for i in range(1, 6)])
    assert tr.x.shape == (5 * N_PER_BATCH, 3, 32, 32) and tr.x.dtype == torch.float32
    np.testing.assert_allclose(tr.x.numpy(), ex)
    np.testing.assert_array_equal(tr.y.numpy(), ey)
    assert len(te) == 3 and te.info.num_classes == 10
    assert abs(te.info.default_epsilon - 36 / 255) < 1e-12


def test_cifar10_tarball(tmp_path, monkeypatch):
    src = tmp_path / "src"
    blobs = make_cifar10_folder(src / "cifar-10-batches-py")
    root = tmp_path / "root"
    (root / "cifar10").mkdir(parents=True)
    tar_path = root / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    # with the published MD5 the fake tarball is rejected ...
    with pytest.raises(DatasetError, match="c58f30108f718f92721af3b95e74349a"):
        get_dataset("cifar10", "test", root=root)
    # ... with its own MD5 it loads, straight from the tarball (nothing is extracted)
    v = _cifar.RESOURCES["cifar10"]
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    res = dataclasses.replace(v.resource, md5=md5)
    monkeypatch.setitem(_cifar.RESOURCES, "cifar10", dataclasses.replace(v, resource=res))
    tr = get_dataset("cifar10", "train", root=root)
    ex, ey = expected(blobs, [f"data_batch_{i}" for i in range(1, 6)])
    np.testing.assert_allclose(tr.x.numpy(), ex)
    np.testing.assert_array_equal(tr.y.numpy(), ey)
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar100_folder_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    tr = get_dataset("cifar100", "train", root=tmp_path)
    assert tr.x.shape == (6, 3, 32, 32) and tr.info.num_classes == 100
    assert len(set(tr.info.classes)) == 100


def test_cifar_missing_names_paths(tmp_path):
    with pytest.raises(DatasetError) as ei:
        get_dataset("cifar10", "train", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "cifar10" / "cifar-10-python.tar.gz") in msg
    assert "download=True" in msg
    # The npz route and its flag, for a user who holds the images as arrays.
    assert "DIR/cifar10.npz" in msg and "--data-dir DIR" in msg and "numpy.savez" in msg


def save_npz(path: Path, n_train: int = 6, hw: int = 32, top_label: int = 9) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, hw, hw, 3), dtype=np.uint8),
        "train_y": np.arange(n_train) % (top_label + 1),
        "test_x": rng.integers(0, 256, (4, hw, hw, 3), dtype=np.uint8),
        "test_y": np.array([3, 1, top_label, 0]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("where", ["cifar10/cifar10.npz", "cifar10.npz"])
def test_cifar10_npz_in_data_root(tmp_path, where):
    arrays = save_npz(tmp_path / where)
    for split in ("train", "test"):
        s = get_dataset("cifar10", split, root=tmp_path)
        want = arrays[f"{split}_x"].transpose(0, 3, 1, 2).astype(np.float32) / 255
        np.testing.assert_allclose(s.x.numpy(), want)
        np.testing.assert_array_equal(s.y.numpy(), arrays[f"{split}_y"])
        assert s.info == _cifar.CIFAR10  # CIFAR-10's classes, ε and augmentation default


def test_cifar10_data_root_may_be_the_npz_itself(tmp_path):
    arrays = save_npz(tmp_path / "mine.npz", n_train=7)
    tr = get_dataset("cifar10", "train", root=tmp_path / "mine.npz")
    assert len(tr) == 7 and tr.info.name == "cifar10"
    np.testing.assert_array_equal(tr.y.numpy(), arrays["train_y"])


def test_cifar10_npz_of_other_data_is_refused(tmp_path):
    save_npz(tmp_path / "small" / "cifar10.npz", hw=28)
    with pytest.raises(DatasetError, match=r"\(3, 28, 28\).*does not hold cifar10"):
        get_dataset("cifar10", "train", root=tmp_path / "small")
    save_npz(tmp_path / "c100" / "cifar10.npz", top_label=99)
    with pytest.raises(DatasetError, match="labels up to 99.*10 classes"):
        get_dataset("cifar10", "test", root=tmp_path / "c100")
    # cifar100 takes 100 classes from its own cifar100.npz.
    save_npz(tmp_path / "c100" / "cifar100.npz", top_label=99)
    assert get_dataset("cifar100", "test", root=tmp_path / "c100").info.num_classes == 100


def test_cifar10_data_root_file_must_be_npz(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"x")
    with pytest.raises(DatasetError, match="is a file but not an .npz; pass the folder"):
        get_dataset("cifar10", "train", root=tmp_path / "cifar-10-python.tar.gz")


def test_cifar_bad_content(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10_folder(folder)
    d = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch.*3072"):
        get_dataset("cifar10", "test", root=tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch"):
        get_dataset("cifar10", "test", root=tmp_path)


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_restricted_unpickler_rejects_os_system(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _SystemPayload(marker)}, protocol=2)
    with pytest.raises(DatasetError, match=r"refusing to unpickle .*system from evil"):
        restricted_loads(blob, "evil")
    assert not marker.exists()
    # and through the loader, naming the file
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10_folder(folder)
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(DatasetError, match="not part of the CIFAR format") as ei:
        get_dataset("cifar10", "test", root=tmp_path)
    assert str(folder / "test_batch") in str(ei.value)
    assert not marker.exists()


def test_restricted_unpickler_rejects_custom_class_and_builtins():
    with pytest.raises(DatasetError, match=r"refusing to unpickle .*Custom"):
        restricted_loads(pickle.dumps(Custom()), "custom.pkl")
    evil = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(DatasetError, match=r"refusing to unpickle builtins\.eval"):
        restricted_loads(evil, "eval.pkl")


def test_restricted_unpickler_allows_numpy_arrays():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        out = restricted_loads(pickle.dumps({b"data": arr}, protocol=protocol), "ok")
        np.testing.assert_array_equal(out[b"data"], arr)
    out = restricted_loads(pickle.dumps(io.BytesIO(b"").getvalue(), protocol=2), "ok")
    assert out == b""
