"""Progress bars with an ETA for the long phases of an evaluation: certification, PGD, the
Lipschitz lower bounds and the cost timings.

Bars go to stderr and vanish when their phase ends. They are on by default; turn them off
for a block with ``with progress.shown(False):`` (``gloro evaluate --no-progress``,
``EvalOptions(progress=False)``).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["shown", "bar"]

_SHOWN = contextvars.ContextVar("torchgloro_evaluate_progress", default=True)


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Shows (or hides) the bars of the evaluation phases run inside the block."""
    token = _SHOWN.set(bool(on))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def bar(desc: str, total: int, unit: str = "step") -> tqdm:
    """A bar for one phase of ``total`` units (update it with ``.update(k)``; close it)."""
    return tqdm(
        total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
        disable=not _SHOWN.get(), dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip
