"""After each epoch: certify the validation split (and the test split when asked), and keep
``best.safetensors``, the epoch with the best VRA on the selection split.

The selection split is the validation split (``data.val_size`` training images held out).
With ``data.val_size = 0``, and in runs saved before validation splits existed, the test
split takes its place, as it always did; ``best.safetensors`` then records that it was
picked on the test split, and every command that loads it says so. With neither
(``tg.train`` on training data alone) no epoch is selected and no ``best.safetensors``
written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchgloro import io
from torchgloro.data import Split
from torchgloro.gloro import GloroNet
from torchgloro.train import distributed as ddp
from torchgloro.train.build import Splits, evaluate

__all__ = ["BEST_FILE", "epoch_metrics", "Selection"]

BEST_FILE = "best.safetensors"
_NAN = {"clean": float("nan"), "vra": float("nan"), "rejection": float("nan")}


def epoch_metrics(
    net: GloroNet, splits: Splits, epsilon: float, batch_size: int, env: ddp.DistEnv,
    test_every_epoch: bool,
) -> dict[str, float]:  # fmt: skip
    """``val_*`` and ``test_*`` clean accuracy, VRA and rejection at ``epsilon`` (fast mode;
    NaN for a split not certified: the test split only without validation or when asked)."""
    wanted: dict[str, Split | None] = {
        "val": splits.val,
        "test": splits.test if splits.val is None or test_every_epoch else None,
    }
    out: dict[str, float] = {}
    for name, split in wanted.items():
        r = _NAN if split is None else evaluate(net, split, epsilon, "fast", batch_size, env)
        out |= {f"{name}_clean_acc": r["clean"], f"{name}_vra": r["vra"],
                f"{name}_rejection": r["rejection"]}  # fmt: skip
    return out


class Selection:
    """The best epoch so far on the selection split, kept in ``best.safetensors``.

    Args:
        splits: The run's data (the validation split, if any, is the selection split).
        best: The best so far, from a checkpoint (older ones lack ``split``: test).
    """

    def __init__(self, splits: Splits, best: dict[str, Any] | None = None) -> None:
        held_out = splits.val if splits.val is not None else splits.test
        self.split = None if held_out is None else "test" if splits.val is None else "validation"
        self.n = len(held_out) if held_out is not None else 0
        self.best: dict[str, Any] = {"split": "test", **best} if best else {
            "vra": -1.0, "clean": -1.0, "epoch": 0, "split": self.split,
        }  # fmt: skip

    @property
    def prefix(self) -> str:
        """The metrics-row prefix of the selection split (``val`` or ``test``)."""
        return "val" if self.split == "validation" else "test"

    def update(self, row: dict[str, float], net: GloroNet, run_dir: Path, total: int) -> None:
        """Saves ``net`` as ``best.safetensors`` if ``row``'s epoch beats the best so far."""
        if self.split is None:
            return
        vra, clean = row[f"{self.prefix}_vra"], row[f"{self.prefix}_clean_acc"]
        if (vra, clean) <= (self.best["vra"], self.best["clean"]):
            return
        self.best = {"vra": vra, "clean": clean, "epoch": int(row["epoch"]), "split": self.split}
        chosen = {**self.best, "n": self.n, "epsilon": net.epsilon, "total_epochs": total}
        io.save_gloro(net, run_dir / BEST_FILE, selection=chosen)
