"""The defaults of an evaluation."""

from __future__ import annotations

from torchgloro.evaluate.options import EvalOptions

# docs/evaluation.md: the lower bounds took up to 18 ms per point-step (wall) on the 2-core
# CPU for MNIST 2C2F, under a load of 8; `--lower-bounds` on an MNIST test set must finish
# in minutes by default, even then.
SECONDS_PER_POINT_STEP = 18e-3
MINUTES = 5


def test_lower_bound_defaults_finish_in_minutes_on_the_documented_cost():
    o = EvalOptions()
    point_steps = o.lb_points * o.lb_steps + o.lb_points * o.local_steps  # global + local
    assert point_steps * SECONDS_PER_POINT_STEP <= MINUTES * 60
    assert o.lb_points >= 10 and min(o.lb_steps, o.local_steps) >= 100  # still a search
