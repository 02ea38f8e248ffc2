"""Accuracy metrics of a GloRo net (Figure 3a): clean accuracy, VRA, rejection rate, and the
certified-accuracy-vs-ε curve computed in one pass from per-point certified radii.

Everything here is pure math on tensors except :func:`certify_batched`, which runs the net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchgloro.evaluate import progress

__all__ = [
    "CertResult",
    "certify_batched",
    "predict_batched",
    "accuracy",
    "vra",
    "rejection_rate",
    "certified_accuracy_curve",
    "curve_grid",
    "check_curve",
]


@dataclass
class CertResult:
    """Per-point certification results of a whole split (CPU tensors).

    ``pred`` (N,) int64, ``certified`` (N,) bool at ``epsilon``, ``radius`` (N,) float64.
    """

    pred: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor
    epsilon: float
    mode: str


@torch.no_grad()
def certify_batched(net, x: torch.Tensor, epsilon: float, mode: str, batch_size: int = 512):
    """Runs ``net.certify`` over ``x`` (already on the net's device) in batches.

    Returns:
        A :class:`CertResult` with CPU tensors.
    """
    preds, certs, radii = [], [], []
    with progress.bar(f"certify ({mode})", len(x), "point") as shown:
        shown.partial = lambda: {"certified": sum(int(c.sum()) for c in certs)}
        for i in range(0, x.shape[0], batch_size):
            # float64 in sound mode: the tightest radii (the curve and histogram use them).
            prec = "float64" if mode == "sound" else "auto"
            c = net.certify(x[i : i + batch_size], epsilon=epsilon, mode=mode, precision=prec)
            preds.append(c.pred.cpu())
            certs.append(c.certified.cpu())
            radii.append(c.radius.detach().to(torch.float64).cpu())
            shown.update(len(c.pred))
    return CertResult(torch.cat(preds), torch.cat(certs), torch.cat(radii), epsilon, mode)


@torch.no_grad()
def predict_batched(f: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N,) argmax predictions of the plain backbone ``f`` (CPU int64)."""
    return torch.cat(
        [f(x[i : i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    )


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y``."""
    return float((pred.cpu() == y.cpu()).double().mean()) if len(y) else 0.0


def vra(pred: torch.Tensor, certified: torch.Tensor, y: torch.Tensor) -> float:
    """Verified-robust accuracy: the fraction of points both correct and certified."""
    if not len(y):
        return 0.0
    return float(((pred.cpu() == y.cpu()) & certified.cpu()).double().mean())


def rejection_rate(certified: torch.Tensor) -> float:
    """Fraction of points where the GloRo net predicts ⊥ (not certified)."""
    return float((~certified.cpu()).double().mean()) if len(certified) else 0.0


def curve_grid(radius: torch.Tensor, epsilon: float, n: int = 201) -> torch.Tensor:
    """Sorted unique ε values: a linear grid on [0, max(2ε, largest finite radius)], ε itself,
    and every distinct finite radius (where the curve steps down)."""
    r = radius.detach().to(torch.float64).cpu()
    finite = r[torch.isfinite(r)]
    top = max(2.0 * epsilon, float(finite.max()) if finite.numel() else 0.0)
    grid = torch.cat(
        [
            torch.linspace(0.0, top, n, dtype=torch.float64),
            torch.tensor([float(epsilon)], dtype=torch.float64),
            finite,
        ]
    )
    return torch.unique(grid)  # sorted


def certified_accuracy_curve(
    radius: torch.Tensor, correct: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Certified accuracy at every ε of ``grid``: fraction of points correct with radius > ε.

    One sort and one ``searchsorted``: O((N + G) log N).

    Args:
        radius: (N,) certified radii (certified at ε ⟺ radius > ε).
        correct: (N,) bool, whether the backbone's prediction is right.
        grid: (G,) radii to evaluate at.

    Returns:
        (G,) float64 accuracies in [0, 1].
    """
    n = radius.numel()
    if n == 0:
        return torch.zeros_like(grid, dtype=torch.float64)
    r = radius.detach().to(torch.float64).cpu()[correct.cpu().bool()]
    r_sorted, _ = torch.sort(r)
    # Number of correct radii <= ε; the rest are > ε (strict, like the certificate).
    at_most = torch.searchsorted(r_sorted, grid.to(torch.float64).cpu(), right=True)
    return (r_sorted.numel() - at_most).to(torch.float64) / n


def check_curve(grid: torch.Tensor, acc: torch.Tensor, epsilon: float, vra_value: float) -> None:
    """Raises ``AssertionError`` unless the curve is non-increasing and equals ``vra_value``
    at ``epsilon`` (which must be on the grid)."""
    if acc.numel() > 1 and bool((acc[1:] > acc[:-1]).any()):
        raise AssertionError("certified-accuracy curve is not non-increasing")
    hit = (grid == float(epsilon)).nonzero()
    if hit.numel() == 0:
        raise AssertionError(f"epsilon {epsilon} is not on the curve's grid")
    at = float(acc[int(hit[0])])
    if abs(at - vra_value) > 1e-12:
        raise AssertionError(f"curve at ε={epsilon} is {at}, but the VRA is {vra_value}")
