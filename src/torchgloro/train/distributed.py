"""Distributed data parallel (DDP) support for ``gloro train`` under ``torchrun``.

``torchrun --nproc_per_node N -m torchgloro.cli train ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`setup` then initialises the process group (``gloo`` on CPU,
``nccl`` on CUDA). Every rank draws the same permutation and takes its shard of each global
batch (:class:`torchgloro.data.DeviceBatches` with ``rank``/``world_size``), so the global
batch size stays ``run.batch_size``. DDP averages gradients, and its default buffer sync
(``broadcast_buffers``; ``forward_sync_buffers`` since torch 2.13) copies rank 0's buffers
(the power-iteration iterates) to every rank at each forward; :func:`buffers_in_sync` checks
that they indeed agree. Metrics are summed with :func:`all_reduce_sum`; only rank 0 writes
files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "detect",
    "setup",
    "teardown",
    "wrap",
    "all_reduce_sum",
    "barrier",
    "buffers_in_sync",
    "agree_on_stop",
    "gather_states",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv:
    """Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    return DistEnv(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def setup(env: DistEnv, device: torch.device) -> None:
    """Initialises the default process group (no-op for a single process)."""
    if not env.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` when running distributed, else ``module``."""
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # Buffers are broadcast from rank 0 at each forward by default in every torch version:
    # `broadcast_buffers` (default True) before 2.13, `forward_sync_buffers` (default None,
    # meaning True) since, where passing the old name draws a FutureWarning.
    return DDP(module, device_ids=ids)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sums ``t`` over ranks, in place, and returns it."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_states(state: torch.Tensor, env: DistEnv, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``state`` (a CPU byte tensor of one size on all ranks, such as a
    generator state), in rank order, on every rank (collective: call on all ranks)."""
    if not env.enabled:
        return [state]
    on = state.to(device)  # NCCL gathers device tensors only
    out = [torch.empty_like(on) for _ in range(env.world_size)]
    dist.all_gather(out, on)
    return [t.cpu() for t in out]


@torch.no_grad()
def buffers_in_sync(module: nn.Module, env: DistEnv, rtol: float = 1e-6) -> bool:
    """Whether every floating buffer equals rank 0's (collective: call on all ranks)."""
    if not env.enabled:
        return True
    ok = torch.ones((), dtype=torch.float32, device=next(module.buffers()).device)
    for b in module.buffers():
        if not b.is_floating_point():
            continue
        ref = b.clone()
        dist.broadcast(ref, src=0)
        same = torch.allclose(b, ref, rtol=rtol, atol=0.0, equal_nan=True)
        ok = ok * float(same)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def agree_on_stop(stop, env: DistEnv, device: torch.device) -> None:
    """Under DDP, a stop requested on any rank is requested on all (no-op otherwise)."""
    if env.enabled:
        flag = torch.tensor(float(stop.requested is not None), device=device)
        if all_reduce_max(flag, env).item() > 0:
            stop.request(stop.requested or "a signal on another rank")
