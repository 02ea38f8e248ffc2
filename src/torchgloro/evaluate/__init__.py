"""Evaluation of GloRo nets, after Section 5 of Leino et al. (2021).

* :mod:`~torchgloro.evaluate.metrics`: clean accuracy, VRA (sound and fast), rejection rate,
  certified-accuracy-vs-ε curve.
* :mod:`~torchgloro.evaluate.attacks`: ℓ2 PGD on the backbone.
* :mod:`~torchgloro.evaluate.lower_bounds`: empirical global/local Lipschitz lower bounds
  (Appendix E) against the net's sound and fast upper bounds.
* :mod:`~torchgloro.evaluate.cost`: training cost from ``metrics.csv``, certification cost.
* :mod:`~torchgloro.evaluate.report`: ``evaluation.json``/``.md``, plots, compare table.
* :func:`evaluate_run` / :func:`evaluate_net`: everything at once (``gloro evaluate``).
"""

from torchgloro.evaluate import attacks, cost, lower_bounds, metrics, report
from torchgloro.evaluate.attacks import PGDResult, pgd_l2
from torchgloro.evaluate.lower_bounds import (
    LowerBound,
    check_against_upper,
    global_lower_bound,
    local_lower_bound,
    upper_bounds,
)
from torchgloro.evaluate.metrics import certified_accuracy_curve, curve_grid
from torchgloro.evaluate.report import compare_table
from torchgloro.evaluate.runner import EvalOptions, evaluate_net, evaluate_run

__all__ = [
    "EvalOptions",
    "evaluate_net",
    "evaluate_run",
    "pgd_l2",
    "PGDResult",
    "global_lower_bound",
    "local_lower_bound",
    "upper_bounds",
    "check_against_upper",
    "LowerBound",
    "certified_accuracy_curve",
    "curve_grid",
    "compare_table",
    "attacks",
    "cost",
    "lower_bounds",
    "metrics",
    "report",
]
