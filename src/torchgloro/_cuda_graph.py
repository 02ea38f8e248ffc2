"""Power iteration replayed from a CUDA graph.

A training step runs ``power_iterations`` iterations on every layer: a few hundred tiny,
single-instance kernels whose launch cost, not their arithmetic, sets the step time on a
GPU. They read the layers' parameters and update the persistent iterates in place, always
at the same addresses, so one captured graph can replay them all with a single launch.

A graph is captured on first use of an iteration count, and all are dropped whenever a
tensor they read moves (``.to()``, a replaced parameter). The first capture is checked against
the eager iterations; on any failure or mismatch the owner falls back to eager, with a
warning that says why. Power iteration only feeds the *training* estimate: certification
never depends on it (sound mode uses proven bounds), so a fallback costs time, not
soundness.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__: list[str] = []  # internal


def graphs_usable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a graph can replay work on ``tensors`` here: CUDA, not capturing, not tracing."""
    return (
        len(tensors) > 0
        and all(t.is_cuda for t in tensors)
        and not torch.cuda.is_current_stream_capturing()
        and not getattr(torch.compiler, "is_compiling", lambda: False)()
    )


def iterates_agree(replayed: torch.Tensor, eager: torch.Tensor, rtol: float = 1e-2) -> bool:
    """Whether a replayed iterate matches the eager one, norm-wise.

    cuDNN convolutions run in TF32 by default and may pick other algorithms inside a capture,
    so element-wise agreement to 1e-4 fails by chance (it did on an H100 in 2026-11). A graph
    that reads stale memory or skips work is off by O(1); 1 % of the norm separates the two.
    """
    diff = torch.linalg.vector_norm((replayed - eager).double())
    return bool(diff <= rtol * torch.linalg.vector_norm(eager.double()) + 1e-12)


class GraphedIterations:
    """Replays ``run(n)`` (in-place work on ``state`` that reads ``inputs``) from CUDA graphs.

    One graph per iteration count (training's ``power_iterations``, ``refresh``'s 10), all
    dropped when a tensor they read moves. A copy (``copy.deepcopy``, pickling) starts
    without graphs: it captures its own.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._ptrs: tuple[int, ...] | None = None
        self._checked = False
        self.disabled_reason: str | None = None

    def __deepcopy__(self, memo) -> GraphedIterations:
        return GraphedIterations()

    def __getstate__(self) -> dict:
        return GraphedIterations().__dict__

    def __call__(
        self,
        run: Callable[[int], None],
        n: int,
        state: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
    ) -> None:
        """Does ``run(n)``, from a graph when it can.

        Args:
            run: Does ``n`` iterations in place: no host syncs, no new outputs.
            n: The iteration count.
            state: The tensors ``run`` updates (the iterates).
            inputs: The other tensors ``run`` reads (the parameters).
        """
        if self.disabled_reason is not None or n <= 0:
            run(n)
            return
        ptrs = tuple(t.data_ptr() for t in (*state, *inputs))
        if ptrs != self._ptrs:  # something moved: every graph reads freed memory now
            self._graphs.clear()
            self._ptrs = ptrs
        key = (n, torch.is_autocast_enabled())
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(run, n, state)
            except Exception as e:  # noqa: BLE001 - any capture failure means: stay eager
                self._disable(f"capture failed ({type(e).__name__}: {e})")
                run(n)
                return
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, run: Callable[[int], None], n: int, state: Sequence[torch.Tensor]):
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            run(n)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            run(n)
        # The warm-up advanced the iterates; start again from where the caller left them.
        for t, s in zip(state, saved):
            t.copy_(s)
        if not self._checked:  # once per object: the replay must match the eager iterations
            run(n)
            eager = [t.clone() for t in state]
            for t, s in zip(state, saved):
                t.copy_(s)
            graph.replay()
            ok = all(iterates_agree(a, b) for a, b in zip(state, eager))
            for t, s in zip(state, saved):
                t.copy_(s)
            if not ok:
                raise RuntimeError("the replayed iterations differ from the eager ones")
            self._checked = True
        return graph

    def _disable(self, reason: str) -> None:
        self._graphs.clear()
        self._ptrs, self.disabled_reason = None, reason
        warnings.warn(
            f"torchgloro: power iteration runs eagerly on this GPU: {reason}. Training is "
            f"unaffected but slower; set cuda_graphs=False on GloroNet to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
