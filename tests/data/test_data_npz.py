"""User data in .npz form, and the real CIFAR-10 npz (the full test set) when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchgloro._errors import DatasetError, GloroInputError
from torchgloro.data import get_dataset


def save(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_hwc_uint8(tmp_path):
    rng = np.random.default_rng(0)
    tx = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    name = save(
        tmp_path / "a.npz",
        train_x=tx,
        train_y=np.array([0, 1, 2, 3, 0, 1, 2], np.uint8),
        test_x=rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8),
        test_y=np.array([4, 0], np.int64),
    )
    with pytest.warns(UserWarning, match=r"test label\(s\) 4 never occur in train_y"):
        tr = get_dataset(name, "train")
    assert tr.x.shape == (7, 3, 5, 6) and tr.x.dtype == torch.float32
    np.testing.assert_allclose(tr.x.numpy(), tx.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)
    assert tr.y.dtype == torch.int64
    assert tr.info.num_classes == 5 and tr.info.in_shape == (3, 5, 6)
    assert tr.info.default_epsilon == pytest.approx(36 / 255)
    with pytest.warns(UserWarning, match="never occur in train_y"):
        assert len(get_dataset(name, "test")) == 2


def test_npz_warns_about_a_stray_label(tmp_path, recwarn):
    x = np.zeros((6, 8, 8), np.uint8)
    name = save(tmp_path / "s.npz", train_x=x, train_y=np.array([0, 1, 2, 0, 1, 255]),
                test_x=x[:3], test_y=np.array([0, 1, 2]))  # fmt: skip
    with pytest.warns(UserWarning, match=r"256 classes .* 252 of them have no image \(3, 4,"):
        assert get_dataset(name, "train").info.num_classes == 256
    recwarn.clear()
    ok = save(tmp_path / "ok.npz", train_x=x, train_y=np.array([0, 1, 2, 0, 1, 2]),
              test_x=x[:3], test_y=np.array([2, 1, 2]))  # fmt: skip
    assert get_dataset(ok, "test").info.num_classes == 3
    assert not [w for w in recwarn if "label" in str(w.message)]


def test_npz_chw_float_and_hw(tmp_path):
    rng = np.random.default_rng(1)
    tx = rng.random((4, 1, 9, 9), dtype=np.float32)
    name = save(
        tmp_path / "b.npz",
        train_x=tx,
        train_y=np.array([0, 1, 1, 0]),
        test_x=rng.random((2, 1, 9, 9)),
        test_y=np.array([1, 1]),
    )
    tr = get_dataset(name, "train")
    np.testing.assert_array_equal(tr.x.numpy(), tx)
    assert tr.info.default_epsilon == 0.3 and tr.info.num_classes == 2
    name = save(
        tmp_path / "c.npz",
        train_x=np.zeros((3, 8, 8), np.uint8),
        train_y=np.zeros(3, np.int32),
        test_x=np.zeros((1, 8, 8), np.uint8),
        test_y=np.zeros(1, np.int32),
    )
    assert get_dataset(name, "test").x.shape == (1, 1, 8, 8)


def good(**over):
    a = dict(
        train_x=np.zeros((4, 8, 8, 3), np.uint8),
        train_y=np.array([0, 1, 2, 1]),
        test_x=np.zeros((2, 8, 8, 3), np.uint8),
        test_y=np.array([0, 1]),
    )
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


@pytest.mark.parametrize(
    "over, pattern",
    [
        (dict(train_x=np.full((4, 8, 8, 3), 2.0, np.float32)), r"\[0, 1\].*max 2"),
        (dict(train_x=np.full((4, 8, 8, 3), np.nan, np.float32)), "NaN"),
        (dict(train_y=np.array([0, 1, 2])), "train_x has shape .* train_y"),
        (dict(test_y=np.array([0, -1])), "negative label"),
        (dict(train_y=np.array([0.0, 1.0, 2.0, 1.0])), "integers"),
        (dict(test_x=None), "missing array.*test_x"),
        (dict(train_x=np.zeros((4, 8, 8, 5), np.uint8)), "channel axis"),
        (dict(train_x=np.zeros((4, 3, 8, 3), np.uint8)), "ambiguous"),
        (dict(train_x=np.zeros((4, 8, 8, 3), np.int32)), "dtype int32"),
        (dict(test_x=np.zeros((2, 3, 9, 9), np.uint8)), "differ in shape"),
    ],
)
def test_npz_bad(tmp_path, over, pattern):
    name = save(tmp_path / "bad.npz", **good(**over))
    with pytest.raises(DatasetError, match=pattern) as ei:
        get_dataset(name, "train")
    assert "bad.npz" in str(ei.value)


def test_npz_bad_path_and_pickles(tmp_path):
    with pytest.raises(GloroInputError, match="needs a path"):
        get_dataset("npz:", "train")
    with pytest.raises(DatasetError, match="no such file"):
        get_dataset(f"npz:{tmp_path / 'nope.npz'}", "train")
    obj = np.empty(4, dtype=object)
    name = save(tmp_path / "obj.npz", **good(train_y=obj))
    with pytest.raises(DatasetError, match="obj.npz"):
        get_dataset(name, "train")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="junk.npz"):
        get_dataset(f"npz:{tmp_path / 'junk.npz'}", "train")


@pytest.fixture(scope="module")
def real_cifar(cifar10_dir):
    name = f"npz:{cifar10_dir / 'cifar10.npz'}"
    return get_dataset(name, "train"), get_dataset(name, "test")


def test_real_cifar_npz(real_cifar):
    tr, te = real_cifar
    assert tr.x.shape == (50000, 3, 32, 32) and te.x.shape == (10000, 3, 32, 32)
    mean = tr.x.mean(dim=(0, 2, 3)).tolist()
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)
    assert te.x.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0.4942, 0.4851, 0.4504], abs=1e-3)
    assert torch.bincount(tr.y).tolist() == [5000] * 10
    assert torch.bincount(te.y).tolist() == [1000] * 10
    assert tr.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert te.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert tr.info.num_classes == 10 and tr.info.default_epsilon == pytest.approx(36 / 255)


def test_real_cifar_by_name_from_data_dir(real_cifar, cifar10_dir):
    # get_dataset("cifar10", root=DIR) (CLI: --data-dir DIR) reads DIR/cifar10.npz: the same
    # pixels as npz:PATH, with CIFAR-10's own class names and augmentation default.
    _, te = real_cifar
    by_name = get_dataset("cifar10", "test", root=cifar10_dir)
    assert torch.equal(by_name.x, te.x) and torch.equal(by_name.y, te.y)
    assert by_name.info.name == "cifar10" and by_name.info.classes[0] == "airplane"
    assert by_name.info.augment_by_default


@pytest.mark.parametrize("stray", [100_000, 10**6, 10**9])
def test_npz_huge_label_is_an_error(tmp_path, stray):
    # 1 + the largest label classes: a stray 10**9 used to build set(range(10**9)) (OOM)
    # and a 10**6-class DatasetInfo; now anything above MAX_CLASSES is refused up front.
    name = save(tmp_path / "huge.npz", **good(train_y=np.array([0, 1, 2, stray])))
    for split in ("train", "test"):
        with pytest.raises(DatasetError) as ei:
            get_dataset(name, split)
        msg = str(ei.value)
        assert "huge.npz" in msg and f"largest label is {stray}" in msg
        assert "4 distinct" in msg and "relabel the data as 0..C-1" in msg


def test_npz_class_count_limit_is_inclusive(tmp_path, recwarn):
    from torchgloro.data._npz import MAX_CLASSES

    name = save(tmp_path / "edge.npz", **good(train_y=np.array([0, 1, 2, MAX_CLASSES - 1])))
    tr = get_dataset(name, "train")
    assert tr.info.num_classes == MAX_CLASSES == 100_000
    (w,) = [w for w in recwarn if "have no image" in str(w.message)]
    assert f"{MAX_CLASSES - 4} of them have no image (3, 4, 5, 6, 7, 8, 9, 10, …)" in str(w.message)


def test_npz_label_too_large_for_int64(tmp_path):
    y = np.array([0, 1, 2, 2**63 + 5], np.uint64)  # used to wrap to a "negative label"
    name = save(tmp_path / "u64.npz", **good(train_y=y))
    with pytest.raises(DatasetError, match=r"u64\.npz:train_y: label 9223372036854775813 is too"):
        get_dataset(name, "train")


def test_npz_gap_warning_lists_every_gap_when_few(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    name = save(
        tmp_path / "g.npz",
        train_x=x,
        train_y=np.array([0, 2, 5, 0]),
        test_x=x[:2],
        test_y=np.array([7, 2]),
    )
    with pytest.warns(UserWarning) as record:
        assert get_dataset(name, "train").info.num_classes == 8
    msgs = [str(w.message) for w in record]
    gaps = "8 classes (1 + the largest label, 7), but 4 of them have no image (1, 3, 4, 6)."
    assert any(gaps in m for m in msgs), msgs
    assert any("test label(s) 7 never occur in train_y" in m for m in msgs), msgs


@pytest.mark.parametrize("empty", ["train", "test"])
def test_npz_empty_split_is_an_error(tmp_path, empty):
    arrays = good(
        **{f"{empty}_x": np.zeros((0, 8, 8, 3), np.uint8), f"{empty}_y": np.zeros(0, np.int64)}
    )
    name = save(tmp_path / "empty.npz", **arrays)
    for split in ("train", "test"):  # either split refuses a file with an empty split
        with pytest.raises(DatasetError) as ei:
            get_dataset(name, split)
        msg = str(ei.value)
        assert "empty.npz" in msg and f"{empty}_x has 0 images" in msg
        assert "need at least one image" in msg
