"""A stopped evaluation keeps what it finished.

Ctrl-C raises ``KeyboardInterrupt``; inside :func:`signals_stop` SIGTERM raises
:class:`Interrupted` as well. As the exception leaves the phase in progress (a
:func:`torchgloro.evaluate.progress.bar`), the phase records how far it got (``n`` done of
``N``, and its figures so far); :func:`torchgloro.evaluate.runner.evaluate_net` adds the
results of the phases that finished; ``gloro evaluate`` writes them, labelled partial, and
exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "signals_stop", "EXIT_CODES"]

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report


class Interrupted(KeyboardInterrupt):
    """An evaluation stopped by a signal, with what it had done.

    Attributes:
        signal: ``"SIGINT"`` or ``"SIGTERM"``.
        phase: The phase in progress (``{"phase", "done", "total", "unit", "partial": True,
            ...its figures so far}``), or None between phases.
        result: The evaluation's results so far (set by ``evaluate_net``; with a
            ``"stopped"`` entry), or None.
        arrays: The per-point arrays for the plots, when certification had finished.
    """

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal = signal_name
        self.phase: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.arrays: dict[str, Any] | None = None

    @classmethod
    def of(cls, exc: KeyboardInterrupt) -> Interrupted:
        """``exc`` itself if it is one, else a new one for Ctrl-C (raise it ``from exc``)."""
        return exc if isinstance(exc, Interrupted) else cls("SIGINT")


@contextmanager
def signals_stop() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Interrupted` (Ctrl-C raises
    ``KeyboardInterrupt`` as always); the old handler is back after it. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        signal.signal(signum, old)  # a second SIGTERM ends the process
        raise Interrupted(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
