"""Progress bars with an ETA for the long phases of an evaluation: certification, PGD, the
Lipschitz lower bounds and the cost timings.

Bars go to stderr and vanish when their phase ends. They are on by default; turn them off
for a block with ``with progress.shown(False):`` (``gloro evaluate --no-progress``,
``EvalOptions(progress=False)``). A phase stopped by Ctrl-C or SIGTERM records how far it
got (:mod:`torchgloro.evaluate.stopping`).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from torchgloro.evaluate.stopping import Interrupted

__all__ = ["shown", "bar", "Phase"]

_SHOWN = contextvars.ContextVar("torchgloro_evaluate_progress", default=True)


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Shows (or hides) the bars of the evaluation phases run inside the block."""
    token = _SHOWN.set(bool(on))
    try:
        yield
    finally:
        _SHOWN.reset(token)


class Phase:
    """One phase of an evaluation: its bar, and the count of units done (kept with the bars
    hidden too), for the record of a stopped evaluation
    (:class:`~torchgloro.evaluate.stopping.Interrupted`).

    ``partial`` may be set to a function giving the phase's figures so far; it is called
    only if the phase is stopped.
    """

    def __init__(self, desc: str, total: int, unit: str) -> None:
        self.desc, self.total, self.unit, self.done = desc, int(total), unit, 0
        self.partial: Callable[[], dict[str, Any]] | None = None
        self._bar = tqdm(
            total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
            disable=not _SHOWN.get(), dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip

    def update(self, k: int = 1) -> None:
        self.done += k
        self._bar.update(k)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if not isinstance(exc, KeyboardInterrupt):
            return
        stop = Interrupted.of(exc)
        if stop.phase is None:  # the innermost phase records where it stopped
            figures = self.partial() if self.partial is not None else {}
            stop.phase = {"phase": self.desc, "done": self.done, "total": self.total,
                          "unit": self.unit, "partial": True, **figures}  # fmt: skip
        if stop is not exc:
            raise stop from exc


def bar(desc: str, total: int, unit: str = "step") -> Phase:
    """A phase of ``total`` units with its bar (``.update(k)``; use it as a context)."""
    return Phase(desc, total, unit)
