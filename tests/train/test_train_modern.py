"""Issue 8 options through the training pipeline: new recipes, losses, LLN, liresnet."""

from __future__ import annotations

import math

import numpy as np
import pytest

from torchgloro.train import load_config, train


@pytest.fixture(scope="module")
def mnist_shaped_npz(tmp_path_factory):
    """A small synthetic MNIST-shaped dataset in the npz format (no real data needed)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "fake-mnist.npz"
    x = rng.integers(0, 256, size=(600, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=600).astype(np.int64)
    np.savez(path, train_x=x[:512], train_y=y[:512], test_x=x[512:], test_y=y[512:])
    return path


@pytest.mark.parametrize(
    "recipe,options", [("mnist-2c2f-plus", {}), ("mnist-4c3f-plus", {"lln": True})]
)
def test_plus_recipes_train_a_step(recipe, options, mnist_shaped_npz, tmp_path):
    cfg = load_config(
        recipe,
        [f"data.name=npz:{mnist_shaped_npz}", "data.val_size=0", f"run.out={tmp_path}",
         "run.batch_size=64"],
    )  # fmt: skip
    assert cfg.model.activation == "minmax" and cfg.model.options == options
    res = train(cfg, stop_after=2 / 8, progress=False)  # 2 of the 8 steps of epoch 1
    assert (res.run_dir / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize("loss", ["emma", "hinge", "certified-hinge"])
def test_margin_losses_train_on_digits(loss, tmp_path):
    cfg = load_config(None, [f"loss.name={loss}", "run.epochs=3", f"run.out={tmp_path}"])
    res = train(cfg, progress=False)
    last = res.history[-1] if hasattr(res, "history") else None
    assert res.run_dir.is_dir()
    if last is not None:
        assert math.isfinite(last["train_loss"])


def test_liresnet_through_config(tmp_path):
    cfg = load_config(None, [
        "model.arch=liresnet", "model.activation=minmax",
        'model.options={"depth": 2, "width": 16, "neck_stride": 2, "dense_width": 0}',
        "run.epochs=1", f"run.out={tmp_path}", "gloro.power_iterations=2",
    ])  # fmt: skip
    res = train(cfg, progress=False)
    text = (res.run_dir / "config.toml").read_text()
    assert "[model.options]" in text and "depth = 2" in text
