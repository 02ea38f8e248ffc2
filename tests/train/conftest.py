"""Fixtures for the training tests: one CPU thread, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"

# A 4-epoch run of 4 steps per epoch: fast enough to train several times per test.
TINY = [
    "data.train_subset=512",
    "run.batch_size=128",
    "run.epochs=4",
    "gloro.power_iterations=2",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train far faster on one thread (and do not fight parallel jobs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny(tmp_path):
    """``tiny(*overrides)`` -> a validated tiny digits config writing under ``tmp_path``."""
    from torchgloro.train import load_config

    def make(*extra: str):
        return load_config(None, [*TINY, f"run.out={tmp_path / 'runs'}", *extra])

    return make
