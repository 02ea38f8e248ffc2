"""Rough inputs that gave raw errors or failed silently (issue #30, item 10)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import torchgloro as tg
from torchgloro._errors import ConfigError, DatasetError
from torchgloro.data import get_dataset
from torchgloro.nn.activations import GroupSort, MinMax
from torchgloro.train import load_config


def test_a_crafted_npz_header_is_a_clear_error(tmp_path):
    """An npz whose header claims 4·10^12 bytes ended in a raw MemoryError."""
    path = tmp_path / "crafted.npz"
    arrays = {
        "train_x": np.zeros((4, 8, 8), np.uint8),
        "train_y": np.array([0, 1, 0, 1]),
        "test_x": np.zeros((2, 8, 8), np.uint8),
        "test_y": np.array([0, 1]),
    }
    np.savez(path, **arrays)
    header = {"descr": "|u1", "fortran_order": False, "shape": (4, 10**6, 10**6)}
    with zipfile.ZipFile(path, "a") as zf:
        with zf.open("huge.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
    names = zipfile.ZipFile(path).namelist()
    # Replace train_x by the crafted entry: rewrite the archive without the original.
    rebuilt = tmp_path / "rebuilt.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rebuilt, "w") as dst:
        for name in names:
            if name == "train_x.npy":
                continue
            dst.writestr("train_x.npy" if name == "huge.npy" else name, src.read(name))
    with pytest.raises(DatasetError, match=r"header of train_x.*bytes"):
        get_dataset(f"npz:{rebuilt}", "train")


def test_an_empty_sequential_is_a_clear_error():
    """``GloroNet(nn.Sequential(), ...)`` raised IndexError."""
    with pytest.raises(tg.UnsupportedLayerError, match="no layers"):
        tg.GloroNet(nn.Sequential(), 0.3, in_shape=(4,))


@pytest.mark.parametrize("act", [MinMax(), GroupSort(2)])
def test_torch_func_transforms_go_through_minmax(act):
    """``torch.func.jacrev``/``vmap`` through MinMax failed."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    jac = torch.func.jacrev(act)(x)  # (3, 4, 3, 4)
    x_ = x.clone().requires_grad_(True)
    rows = [torch.autograd.grad(act(x_).flatten()[k], x_)[0] for k in range(12)]
    assert torch.equal(jac.reshape(12, 3, 4), torch.stack(rows))
    batched = torch.func.vmap(act)(x[:, None, :])  # per-sample (1, 4) inputs
    assert torch.equal(batched[:, 0], act(x))


def test_a_loss_that_a_standard_run_ignores_is_refused():
    """``--set gloro.robust=false --set loss.name=trades`` ignored the loss silently."""
    with pytest.raises(ConfigError, match=r"loss\.name.*gloro\.robust"):
        load_config(None, ["gloro.robust=false", "loss.name=trades"])
    assert load_config(None, ["gloro.robust=false"]).loss.name == "ce"
