"""TensorBoard event files of a run (``run.tensorboard = true``): each epoch's metrics row as
scalars in ``RUN/tensorboard/``. Needs the ``tensorboard`` package (the ``[tensorboard]``
extra); ``tensorboard --logdir runs`` then shows every run."""

from __future__ import annotations

import math
from pathlib import Path

from torchgloro._errors import ConfigError

__all__ = ["TensorBoardLog", "TAGS"]

# metrics.csv column -> TensorBoard tag (grouped by the part before the slash).
TAGS = {
    "train_loss": "loss/train",
    "train_clean_acc": "accuracy/train",
    "val_clean_acc": "accuracy/val",
    "test_clean_acc": "accuracy/test",
    "train_vra": "vra/train@eps_train",  # on the training batches, with the training bound
    "val_vra": "vra/val@eps_test",
    "test_vra": "vra/test@eps_test",
    "val_rejection": "rejection/val",
    "test_rejection": "rejection/test",
    "lipschitz": "bound/max_K_power_iteration",  # converged after the epoch (fast mode's K)
    "epsilon": "schedule/eps_train",
    "lam": "schedule/lambda",
    "lr": "schedule/lr",
    "seconds": "cost/seconds_per_epoch",
    "peak_mem_mb_per_sample": "cost/peak_mb_per_sample",
}


class TensorBoardLog:
    """Writes metrics rows to ``run_dir/tensorboard`` (one step per epoch).

    Args:
        run_dir: The run folder.
        first_epoch: The first epoch this process writes: events of later epochs that a
            resumed run left behind are dropped (TensorBoard's ``purge_step``).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, run_dir: Path, first_epoch: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                f"run.tensorboard = true needs the tensorboard package ({e}): pip install "
                f"'torchgloro[tensorboard]', or set run.tensorboard=false."
            ) from None
        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=first_epoch)

    def append(self, row: dict[str, float]) -> None:
        """Writes ``row``'s figures (NaN ones are skipped) at step ``row["epoch"]``."""
        for key, tag in TAGS.items():
            value = row.get(key, math.nan)
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, int(row["epoch"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
