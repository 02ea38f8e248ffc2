"""``tg.evaluate(net, data)``: the evaluation of ``gloro evaluate`` on your own data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torchgloro._errors import GloroInputError
from torchgloro.data import as_tensors
from torchgloro.evaluate.options import EvalOptions
from torchgloro.evaluate.runner import evaluate_net

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` found; ``details`` holds all of it (as ``evaluation.json``).

    Attributes:
        epsilon: The ℓ2 radius certified at.
        n: Points evaluated.
        clean_accuracy: Accuracy of the backbone's predictions.
        vra: Verified-robust accuracy, sound (proven bounds): correct and certified.
        certified: Fraction of points certified (sound), right or wrong (1 - rejection).
        pgd_accuracy: Accuracy under ℓ2 PGD at ``epsilon`` (None without an attack).
        details: Every figure: fast-mode VRA, radii, PGD and Lipschitz-bound details, timings.
    """

    epsilon: float
    n: int
    clean_accuracy: float
    vra: float
    certified: float
    pgd_accuracy: float | None
    details: dict[str, Any]

    def __str__(self) -> str:
        pgd = "" if self.pgd_accuracy is None else f", PGD {100 * self.pgd_accuracy:.2f}%"
        return (
            f"{self.n} points at ε = {self.epsilon:g}: clean {100 * self.clean_accuracy:.2f}%, "
            f"VRA {100 * self.vra:.2f}%, certified {100 * self.certified:.2f}%{pgd}"
        )


def evaluate(
    net: Any,
    data: Any,
    *,
    attack: str | None = None,
    epsilon: float | None = None,
    lower_bounds: bool = False,
    progress: bool = True,
    **options: Any,
) -> Evaluation:
    """Certifies ``net`` on ``data`` (and attacks it); ``tg.evaluate(...)``.

    Args:
        net: A :class:`~torchgloro.GloroNet`; ``data`` is moved to its device.
        data: An ``(x, y)`` pair of tensors, a ``TensorDataset``, a
            :class:`~torchgloro.data.Split` or a Dataset of ``(x, y)`` pairs.
        attack: ``"pgd"`` for the PGD accuracy (its soundness check included), or None.
        epsilon: The radius (default: ``net.epsilon``).
        lower_bounds: Also optimize empirical Lipschitz lower bounds (minutes).
        progress: Show a progress bar per phase.
        **options: Any other :class:`~torchgloro.evaluate.EvalOptions` field, e.g.
            ``pgd_steps=20``, ``batch_size=256``, ``fallback=True``.

    Raises:
        GloroInputError: an unknown option, or data that is not ``(x, y)``.
        UnsoundBoundError: PGD broke a soundly certified point (a bug; please report it).
        Interrupted: Ctrl-C; its ``result`` holds the parts that finished.
    """
    known = {f.name for f in dataclasses.fields(EvalOptions)} - {"limit", "extra"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GloroInputError(
            f"tg.evaluate: unknown option(s) {', '.join(unknown)}; the options are "
            f"{', '.join(sorted(known))}."
        )
    opts = EvalOptions(
        epsilon=epsilon, attack=attack, lower_bounds=lower_bounds, progress=progress, **options
    )
    x, y = as_tensors(data, what="tg.evaluate")
    device = next(net.parameters()).device
    y = y if y.is_floating_point() else y.long()  # float labels: refused by evaluate_net
    result, _ = evaluate_net(net, x.to(device), y.to(device), opts)
    m = result["metrics"]
    return Evaluation(
        epsilon=result["epsilon"],
        n=result["n"],
        clean_accuracy=m["clean_accuracy"],
        vra=m["vra_sound"],
        certified=1.0 - m["rejection_sound"],
        pgd_accuracy=m.get("pgd_accuracy"),
        details=result,
    )
