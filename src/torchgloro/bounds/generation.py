"""A counter that advances whenever the values of a list of tensors change.

Every cache keyed on the weights (the frozen fast constants, the proven bounds, the
local-fallback plan) compares a generation number that changes whenever a parameter's value
changes. It compares values against a snapshot rather than trusting ``Tensor._version``:
fused optimizers (``Adam(fused=True)``, the default on CUDA here) and writes through ``.data``
change weights without bumping it, and a stale proven bound would certify points it must not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["WeightsGeneration"]


class WeightsGeneration:
    """A counter that advances whenever the values of the tracked parameters change."""

    def __init__(self) -> None:
        self._snapshot: list[torch.Tensor] = []
        self.generation = 0

    def update(self, params: Sequence[torch.Tensor]) -> int:
        """Compares ``params`` with the snapshot; returns the (possibly new) generation."""
        params = [p.detach() for p in params]
        if not _same_values(self._snapshot, params):
            self._snapshot = [q.clone() for q in params]
            self.generation += 1
        return self.generation


def _same_values(snap: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    same = len(snap) == len(params) and all(
        s.shape == q.shape and s.dtype == q.dtype and s.device == q.device
        for s, q in zip(snap, params)
    )
    if not (same and params):  # NaN ≠ NaN below: caches of NaN weights are never reused
        return same
    if all(q.device.type == "cpu" for q in params):  # no temporaries, no launches
        return all(torch.equal(s, q) for s, q in zip(snap, params))
    diff = [(s != q).any() for s, q in zip(snap, params)]
    if len({d.device for d in diff}) == 1:  # one host sync for all parameters
        return not bool(torch.stack(diff).any())
    return not any(bool(d) for d in diff)
