"""Registry, root resolution, Split helpers and the bundled digits dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from torchgloro._errors import GloroInputError
from torchgloro.data import DatasetInfo, Split, get_dataset, list_datasets, resolve_root


def test_list_datasets():
    assert list_datasets() == sorted(
        ["mnist", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "digits"]
    )


def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHGLORO_DATA", raising=False)
    assert resolve_root() == Path.home() / ".cache" / "torchgloro"
    monkeypatch.setenv("TORCHGLORO_DATA", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root(str(tmp_path)) == tmp_path


def test_env_root_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHGLORO_DATA", str(tmp_path))
    with pytest.raises(OSError, match=str(tmp_path / "mnist")):
        get_dataset("mnist", "train")


def test_bad_names_and_splits():
    with pytest.raises(GloroInputError, match="unknown dataset 'imagenet'.*digits"):
        get_dataset("imagenet", "train")
    with pytest.raises(GloroInputError, match="split"):
        get_dataset("digits", "val")


def test_digits_offline():
    tr, te = get_dataset("digits", "train"), get_dataset("DIGITS", "test")
    assert len(tr) + len(te) == 1797 and len(te) == 300
    assert tr.x.shape[1:] == (1, 8, 8) and tr.x.dtype == torch.float32
    assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    assert tr.y.dtype == torch.int64 and set(tr.y.tolist()) == set(range(10))
    assert tr.info.num_classes == 10 and tr.info.default_epsilon == 0.3
    # deterministic and disjoint
    again = get_dataset("digits", "train")
    assert torch.equal(again.x, tr.x) and torch.equal(again.y, tr.y)
    both = torch.cat([tr.x, te.x]).reshape(1797, -1)
    assert torch.unique(both, dim=0).shape[0] >= 1797 - 50  # a few true duplicates exist


def test_split_helpers():
    info = DatasetInfo("t", ("a", "b"), (1, 2, 2), 0.1)
    s = Split(torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 0, 1, 1]), info)
    assert len(s) == 5 and info.num_classes == 2
    assert len(s.subset(3)) == 3 and torch.equal(s.subset(3).x, s.x[:3])
    sub = s.subset([4, 0])
    assert sub.y.tolist() == [1, 0] and torch.equal(sub.x[0], s.x[4])
    assert s.to("cpu").x.device.type == "cpu"
    with pytest.raises(GloroInputError):
        s.subset(6)
    with pytest.raises(GloroInputError):
        s.subset([5])
    with pytest.raises(GloroInputError):
        Split(torch.rand(5, 4), torch.zeros(5, dtype=torch.long), info)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # frozen
