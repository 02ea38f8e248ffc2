"""Shared fixtures: real-data locations, and a small trained GloRo net."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _numeric_guard import numeric_state_guard  # noqa: F401 - autouse: guards every test

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_DIR = SHARED / "cifar10"


def pytest_terminal_summary(terminalreporter, config):
    """Names the random test order (pytest-randomly), also under ``-q``, to replay it."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(
            f"test order: random; replay it with: python -m pytest -q --randomly-seed={seed}"
        )


def pytest_configure(config):
    # The suite is many small ops: one thread per process is fastest and stable on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A folder holding the complete CIFAR-10 as ``cifar10.npz`` (50,000 train and the full
    10,000 test images): the shared one if present, else written by the shared folder's
    ``assemble.py`` into a temporary folder. Skips when the shared data is absent."""
    if (CIFAR_DIR / "cifar10.npz").is_file():
        return CIFAR_DIR
    needed = [CIFAR_DIR / f for f in ("assemble.py", "cifar10-train50k-test1k.npz",
                                      "cifar10-test10k.npz")]  # fmt: skip
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"real CIFAR-10 not found: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run(
        [sys.executable, str(needed[0]), str(out / "cifar10.npz")], check=True, capture_output=True
    )
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _fit_digits(model, loss_fn, epochs: int, seed: int):
    """Trains ``model`` on the embedded digits data with Adam; returns (model, train, test)."""
    import torchgloro as tg

    train = tg.data.get_dataset("digits", "train")
    test = tg.data.get_dataset("digits", "test")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss_fn(model(train.x[idx]), train.y[idx]).backward()
            opt.step()
    model.eval()
    return model, train, test


@pytest.fixture(scope="session")
def trained_digits_net():
    """A minicnn GloRo net trained for a few seconds on the embedded digits data."""
    import torchgloro as tg

    torch.manual_seed(0)
    f = tg.models.create_model("minicnn", (1, 8, 8), 10)
    net = tg.GloroNet(f, epsilon=0.3, power_iterations=5)
    net, train, test = _fit_digits(net, tg.GloroCrossEntropy(), epochs=25, seed=0)
    net.refresh()
    return net, train, test


@pytest.fixture(scope="session")
def standard_digits_net():
    """A GloroNet whose minicnn backbone was trained with plain cross-entropy (standard)."""
    import torchgloro as tg

    torch.manual_seed(1)
    f = tg.models.create_model("minicnn", (1, 8, 8), 10)
    _fit_digits(f, torch.nn.functional.cross_entropy, epochs=4, seed=1)
    net = tg.GloroNet(f, epsilon=0.3, power_iterations=5).eval()
    net.refresh()
    return net
