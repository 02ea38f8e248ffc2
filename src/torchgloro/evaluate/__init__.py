"""Evaluation of GloRo nets, after Section 5 of Leino et al. (2021).

* :mod:`~torchgloro.evaluate.metrics`: clean accuracy, VRA (sound and fast), rejection rate,
  certified-accuracy-vs-ε curve.
* :mod:`~torchgloro.evaluate.attacks`: ℓ2 PGD on the backbone.
* :mod:`~torchgloro.evaluate.lower_bounds`: empirical global/local Lipschitz lower bounds
  (Appendix E) against the net's sound and fast upper bounds.
* :mod:`~torchgloro.evaluate.cost`: training cost from ``metrics.csv``, certification cost.
* :mod:`~torchgloro.evaluate.report`: ``evaluation.json``/``.md``, compare table;
  :mod:`~torchgloro.evaluate.plots`: the curve and the radius histogram.
* :mod:`~torchgloro.evaluate.stopping`: a stopped evaluation (Ctrl-C, SIGTERM) keeps what it
  finished.
* :func:`evaluate_run` / :func:`evaluate_net`: everything at once (``gloro evaluate``).
* The package itself is callable: ``tg.evaluate(net, (x, y), attack="pgd")``
  (:func:`torchgloro.evaluate.api.evaluate`) evaluates a net on your own data.
"""

from torchgloro._lazy import callable_module, lazy_attributes

_E = "torchgloro.evaluate"
# Imported on first use (they import torch; `gloro evaluate --help` needs none of it).
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **{
            m: f"{_E}.{m}"
            for m in ("attacks", "cost", "lower_bounds", "metrics", "plots", "report", "stopping")
        },
        "PGDResult": f"{_E}.attacks",
        "pgd_l2": f"{_E}.attacks",
        **{
            name: f"{_E}.lower_bounds"
            for name in (
                "LowerBound",
                "check_against_upper",
                "global_lower_bound",
                "local_lower_bound",
                "upper_bounds",
            )
        },  # fmt: skip
        "certified_accuracy_curve": f"{_E}.metrics",
        "curve_grid": f"{_E}.metrics",
        "compare_table": f"{_E}.report",
        "EvalOptions": f"{_E}.options",
        "Evaluation": f"{_E}.api",
        **{name: f"{_E}.runner" for name in ("evaluate_net", "evaluate_run")},
        "Interrupted": f"{_E}.stopping",
    },
)
callable_module(__name__, f"{_E}.api", "evaluate")  # tg.evaluate(net, data, ...)

__all__ = [
    "EvalOptions",
    "Evaluation",
    "Interrupted",
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
    "plots",
    "report",
    "stopping",
]
