"""The settings of an evaluation (no torch: ``gloro evaluate --help`` shows their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvalOptions"]


@dataclass
class EvalOptions:
    """Settings of an evaluation (defaults follow the paper, Section 5 and Appendix E, but for
    the lower bounds' sizes)."""

    epsilon: float | None = None  # default: config [gloro] epsilon_test, else the net's ε
    attack: str | None = "pgd"  # "pgd" or None
    lower_bounds: bool = False
    cost: bool = False
    fallback: bool = False  # also certify ⊥ points with the local bound (torchgloro.local)
    limit: int | None = None
    seed: int | None = None  # default: config [run] seed, else 0
    pgd_steps: int = 100
    pgd_restarts: int = 1
    pgd_step_size: float | None = None  # default 2.5·ε/steps
    # Lower bounds: sized to finish in minutes on a 2-core CPU for MNIST (docs/evaluation.md);
    # the paper's Appendix E ran 100 pairs/points for 7,500 (global) and 5,000 (local) steps.
    lb_points: int = 20  # pairs for the global bound, and points for the local one
    lb_steps: int = 400
    lb_lr: float = 1e-3
    local_steps: int = 400
    local_lr: float = 1e-3
    batch_size: int = 512
    cost_repeats: int = 3
    curve_points: int = 201
    progress: bool = True  # bars with an ETA on stderr (torchgloro.evaluate.progress)
    extra: dict = field(default_factory=dict)
