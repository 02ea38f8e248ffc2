"""Run-folder outputs: ``metrics.csv`` (one row per epoch) and ``report.md`` with plots."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchgloro._errors import CheckpointError
from torchgloro.io import atomic_write_bytes
from torchgloro.train._tensorboard import TensorBoardLog

__all__ = [
    "METRICS",
    "MetricsLog",
    "read_metrics",
    "write_report",
    "has_final_results",
    "epoch_line",
    "summary_text",
]

METRICS_FILE = "metrics.csv"
REPORT_FILE = "report.md"

# Columns of metrics.csv, in order.
METRICS = (
    "epoch",
    "train_loss",
    "train_clean_acc",
    "train_vra",  # on the training batches at ε_train, training bound; NaN in CE epochs
    "val_clean_acc",  # the validation split (data.val_size); NaN without one
    "val_vra",  # mode="fast", at gloro.epsilon_test
    "val_rejection",  # fraction of points on which the GloRo net predicts ⊥
    "test_clean_acc",  # the test split: NaN unless data.val_size = 0 or run.test_every_epoch
    "test_vra",
    "test_rejection",
    "epsilon",  # ε_train at the end of the epoch
    "lam",
    "lr",
    "lipschitz",  # max entry of K (frozen, converged bound)
    "seconds",
    "peak_mem_mb_per_sample",
)


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv``, flushed at once, and with
    ``tensorboard`` to TensorBoard event files (:mod:`torchgloro.train._tensorboard`)."""

    def __init__(
        self, run_dir: Path, keep_epochs: int | None = None, tensorboard: bool = False
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        rows = read_metrics(self.path, partial_last=True) if self.path.exists() else []
        if keep_epochs is not None:  # resuming: drop rows written after the checkpoint
            rows = [r for r in rows if r["epoch"] <= keep_epochs]
            if len(rows) < keep_epochs:
                print(
                    f"warning: {self.path} holds {len(rows)} of the {keep_epochs} epochs before "
                    f"the checkpoint (the file is missing or was cut short); the log and the "
                    f"plots will lack the others.",
                    file=sys.stderr,
                )
        self.rows: list[dict[str, float]] = rows
        text = io.StringIO()  # rewritten whole and atomically: a kill keeps the old file
        w = csv.DictWriter(text, fieldnames=METRICS, lineterminator="\r\n")
        w.writeheader()
        for r in rows:
            w.writerow(_fmt(r))
        atomic_write_bytes(self.path, text.getvalue().encode())
        self._tensorboard = TensorBoardLog(run_dir, (keep_epochs or 0) + 1) if tensorboard else None

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS).writerow(_fmt(row))
            f.flush()
        if self._tensorboard is not None:
            self._tensorboard.append(row)

    def close(self) -> None:
        """Closes the TensorBoard writer, if any (the CSV is closed after every row)."""
        if self._tensorboard is not None:
            self._tensorboard.close()


def _fmt(row: dict[str, Any]) -> dict[str, str]:
    """A row as text; a column an older file lacks is NaN."""
    return {
        k: (str(int(row[k])) if k == "epoch" else f"{row.get(k, math.nan):.6g}") for k in METRICS
    }


def read_metrics(path: str | Path, partial_last: bool = False) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (``epoch`` as int).

    Args:
        path: The file.
        partial_last: Drop a damaged last row (a run killed while appending it; its epoch
            had no checkpoint yet, so a resume redoes it) instead of raising.

    Raises:
        CheckpointError: a row that cannot be read (or any, without ``partial_last``).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"Cannot read {path} ({e}); restore it or delete it.") from e
    rows = []
    for i, r in enumerate(raw):
        try:
            row = {k: float(v) for k, v in r.items() if k in METRICS}  # older files: fewer
            row["epoch"] = int(row["epoch"])
        except (KeyError, TypeError, ValueError) as e:
            if partial_last and i == len(raw) - 1:
                break
            raise CheckpointError(
                f"{path} is damaged at data row {i + 1} ({e!r}); restore it, or delete that "
                f"row and the rows after it."
            ) from None
        rows.append(row)
    return rows


def _held_out(row: dict[str, float], epsilon_test: float) -> str:
    """The validation and test figures of an epoch's row, each named with its split and ε."""
    parts = [
        f"{split} acc {row[f'{split}_clean_acc']:.3f}  "
        f"{split} VRA@{epsilon_test:g} {row[f'{split}_vra']:.3f}  "
        f"{split} rej {row[f'{split}_rejection']:.3f}  "
        for split in ("val", "test")
        if not math.isnan(row.get(f"{split}_vra", math.nan))
    ]
    return "".join(parts)


def epoch_line(row: dict[str, float], total: int, epsilon_test: float) -> str:
    """One human-readable log line per epoch; every figure names its split and ε."""
    lam = "" if math.isnan(row["lam"]) else f"λ {row['lam']:.3g}  "
    train_vra = "-" if math.isnan(row["train_vra"]) else f"{row['train_vra']:.3f}"
    return (
        f"epoch {int(row['epoch']):>{len(str(total))}}/{total}  loss {row['train_loss']:.4f}  "
        f"train acc {row['train_clean_acc']:.3f}  train VRA@ε_t {train_vra}  "
        f"ε_t {row['epsilon']:.4g}  {_held_out(row, epsilon_test)}{lam}lr {row['lr']:.2e}  "
        f"K {row['lipschitz']:.4g}  {row['seconds']:.1f}s  "
        f"{row['peak_mem_mb_per_sample']:.3g} MB/sample"
    )


def summary_text(final: dict[str, Any], run_dir: Path | None) -> str:
    """The end-of-training summary (also embedded in ``report.md``); without test figures
    (``tg.train`` without test data) it says so."""
    if "n_test" not in final:
        lines = ["No test split: the final weights were not evaluated on test data."]
    else:
        lines = [
            f"Final weights (checkpoint.safetensors), test split ({final['n_test']} images), "
            f"epsilon = {final['epsilon']:g}:",
            f"  clean accuracy   {100 * final['clean']:.2f}%",
            f"  VRA (fast)       {100 * final['vra_fast']:.2f}%   "
            f"rejection {100 * final['rejection_fast']:.2f}%",
        ]
    if "vra_sound" in final:
        lines.append(
            f"  VRA (sound)      {100 * final['vra_sound']:.2f}%   "
            f"rejection {100 * final['rejection_sound']:.2f}%"
        )
    if final.get("best_epoch"):
        lines.append(
            f"best.safetensors: epoch {final['best_epoch']}, the best VRA on the "
            f"{final.get('best_split', 'test')} split"
        )
    if run_dir is not None:
        lines.append(f"Run folder: {run_dir}")
    return "\n".join(lines)


def _plot(
    rows: Sequence[dict[str, float]], keys, labels, title, path, ylabel, log=False, mark=None
) -> None:
    """Plots the columns ``keys`` per epoch; ``mark`` = (epoch, label) draws a vertical line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    epochs = [r["epoch"] for r in rows]
    for key, label in zip(keys, labels):
        ys = [r[key] for r in rows]
        if all(math.isnan(y) for y in ys):
            continue
        ax.plot(epochs, ys, marker="o" if len(rows) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FormatStrFormatter("%.3g")  # "9", not "9×10⁰"
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        # Within a decade only minor ticks fall in range: label them; wider, majors suffice.
        ax.yaxis.set_minor_formatter(plain if hi < 10 * lo else matplotlib.ticker.NullFormatter())
    if mark is not None and mark[0]:
        ax.axvline(mark[0], color="grey", linestyle="--", linewidth=1, label=mark[1])
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_FINAL_HEADING = "## Final results"


def has_final_results(run_dir: Path) -> bool:
    """Whether the run's report holds its final evaluation (an interrupted one does not)."""
    try:
        return _FINAL_HEADING in (Path(run_dir) / "report.md").read_text(errors="replace")
    except OSError:
        return False


def write_report(
    run_dir: Path,
    rows: Sequence[dict[str, float]],
    config_text: str,
    final: dict | None,
    epsilon_test: float | None = None,
    best: dict[str, Any] | None = None,
) -> None:
    """Writes ``report.md`` and its PNG plots (loss, accuracy/VRA at ``epsilon_test``,
    Lipschitz bound), marking ``best``'s epoch (``best.safetensors``)."""
    run_dir = Path(run_dir)
    if rows:
        at = f" at ε = {epsilon_test:g}" if epsilon_test is not None else ""
        mark = None
        if best:
            mark = (best["epoch"], f"best.safetensors (best {best.get('split', 'test')} VRA)")
        _plot(rows, ["train_loss"], ["train loss"], "Training loss", run_dir / "loss.png", "loss",
              mark=mark)  # fmt: skip
        _plot(
            rows,
            ["train_clean_acc", "val_clean_acc", "val_vra", "test_clean_acc", "test_vra"],
            ["train clean accuracy", "validation clean accuracy", f"validation VRA (fast){at}",
             "test clean accuracy", f"test VRA (fast){at}"],
            f"Clean accuracy and VRA{at}",
            run_dir / "accuracy.png",
            "fraction of points",
            mark=mark,
        )  # fmt: skip
        _plot(
            rows,
            ["lipschitz"],
            ["max K: power-iteration estimate, converged after the epoch"],
            "Lipschitz bound (fast mode's K; the sound bound is at the end)",
            run_dir / "lipschitz.png",
            "max over class pairs of K_ij",
            log=True,
            mark=mark,
        )
    parts = [f"# Training report: {run_dir.name}", ""]
    if final is not None:
        parts += [_FINAL_HEADING, "", "```", summary_text(final, None), "```", ""]
    else:
        parts += ["Training has not finished (interrupted or in progress).", ""]
    if rows:
        parts += [
            "## Curves",
            "",
            "![loss](loss.png)",
            "",
            "![accuracy](accuracy.png)",
            "",
            "![lipschitz](lipschitz.png)",
            "",
            "## Metrics per epoch",
            "",
            f"VRA at ε_test{at}, fast mode; train VRA on the training batches at ε_t.",
            "",
            "| epoch | loss | train acc | train VRA@ε_t | ε_t | val acc | val VRA | val rej | "
            "test acc | test VRA | test rej | lr | K | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {int(r['epoch'])} | {r['train_loss']:.4f} | {r['train_clean_acc']:.4f} | "
            f"{r['train_vra']:.4f} | {r['epsilon']:.4g} | "
            + " | ".join(f"{r.get(k, math.nan):.4f}" for k in METRICS[4:10])
            + f" | {r['lr']:.3g} | {r['lipschitz']:.4g} | {r['seconds']:.1f} |"
            for r in rows
        ]
        parts.append("")
    parts += ["## Config", "", "```toml", config_text.rstrip(), "```", ""]
    (run_dir / REPORT_FILE).write_text("\n".join(parts))
