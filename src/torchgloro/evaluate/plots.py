"""The figures of an evaluation: the certified-accuracy-vs-ε curve (CSV and PNG) and the
histogram of certified radii (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["write_curve_csv", "plot_curve", "plot_radius_histogram"]


def write_curve_csv(path: str | os.PathLike, grid: torch.Tensor, acc: torch.Tensor) -> None:
    rows = ["epsilon,certified_accuracy"]
    rows += [f"{float(e)!r},{float(a)!r}" for e, a in zip(grid.tolist(), acc.tolist())]
    Path(path).write_text("\n".join(rows) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(path, grid: torch.Tensor, acc: torch.Tensor, epsilon: float, title: str = ""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.step(grid.numpy(), 100 * acc.numpy(), where="post")
    ax.axvline(epsilon, color="gray", ls="--", lw=1, label=f"ε_test = {epsilon:g}")
    ax.set_xlabel("ε (ℓ2)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, float(grid.max()) if grid.numel() else 1)
    ax.set_title(title or "certified accuracy (sound)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_radius_histogram(path, radius: torch.Tensor, correct: torch.Tensor, epsilon: float):
    plt = _plt()
    r = radius.clone()
    finite = torch.isfinite(r)
    top = float(r[finite].max()) if bool(finite.any()) else 1.0
    r[~finite] = top
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    bins = 40
    ax.hist(
        [r[correct].numpy(), r[~correct].numpy()],
        bins=bins,
        range=(0, max(top, 2 * epsilon)),
        stacked=True,
        label=["correct", "wrong"],
    )
    ax.axvline(epsilon, color="gray", ls="--", lw=1, label=f"ε_test = {epsilon:g}")
    ax.set_xlabel("certified radius (sound)")
    ax.set_ylabel("test points")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
