"""Shared fixtures: real-data locations, and a small trained GloRo net."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_NPZ = SHARED / "cifar10" / "cifar10-train50k-test1k.npz"


def pytest_configure(config):
    # The suite is many small ops: one thread per process is fastest and stable on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_digits_net():
    """A minicnn GloRo net trained for a few seconds on the embedded digits data."""
    import torchgloro as tg

    torch.manual_seed(0)
    train = tg.data.get_dataset("digits", "train")
    test = tg.data.get_dataset("digits", "test")
    f = tg.models.create_model("minicnn", train.info.in_shape, train.info.num_classes)
    net = tg.GloroNet(f, epsilon=0.3, power_iterations=5)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = tg.GloroCrossEntropy()
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(25):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss_fn(net(train.x[idx]), train.y[idx]).backward()
            opt.step()
    net.eval()
    net.refresh()
    return net, train, test
