"""`--set run.tensorboard=true`: each epoch's metrics as TensorBoard scalars in RUN/tensorboard."""

from __future__ import annotations

import sys

import pytest

import torchgloro as tg
from torchgloro.train import train
from torchgloro.train.cli import resume_config


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_logs_every_epoch_once_across_a_resume(tiny):
    """Each tag once per epoch, equal to metrics.csv, also when a resume redoes an epoch."""
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    cfg = tiny("run.tensorboard=true", "run.epochs=3")
    first = train(cfg, stop_after=2, progress=False)
    from torch.utils.tensorboard import SummaryWriter

    # As if killed after logging epoch 3 but before its checkpoint: the resume redoes it.
    with SummaryWriter(str(first.run_dir / "tensorboard")) as w:
        w.add_scalar("loss/train", 123.0, 3)
    done = train(resume_config(first.run_dir, []), resume=first.run_dir, progress=False)
    s = _scalars(done.run_dir)
    rows = done.history
    tags = {
        "val_vra": "vra/val@eps_test",
        "train_loss": "loss/train",
        "lr": "schedule/lr",
        "lipschitz": "bound/max_K_power_iteration",
    }
    for key, tag in tags.items():
        assert [step for step, _ in s[tag]] == [1, 2, 3], tag
        assert [v for _, v in s[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert "vra/test@eps_test" not in s  # NaN: the test split is not certified per epoch


def test_tensorboard_without_the_package_is_a_config_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(tg.ConfigError, match=r"pip install 'torchgloro\[tensorboard\]'"):
        train(tiny("run.tensorboard=true", "run.epochs=1"), progress=False)
