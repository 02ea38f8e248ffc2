"""A run's random-number generators, saved with its checkpoint and restored on resume: torch's
CPU (and CUDA) state, the data order (from the start of the epoch) and each rank's
augmentation stream."""

from __future__ import annotations

import torch

from torchgloro.train.checkpoint import Checkpoint

__all__ = ["rng_tensors", "restore_rng"]


def rng_tensors(data_gen, aug_gen, data_epoch_start, device) -> dict[str, torch.Tensor]:
    """RNG states: torch CPU (+ CUDA), the data order and the augmentation generators."""
    out = {
        "rng.torch_cpu": torch.get_rng_state(),
        "rng.data": data_gen.get_state(),
        "rng.data_epoch_start": data_epoch_start,
        "rng.augment": aug_gen.get_state(),
    }
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(ckpt: Checkpoint, data_gen, aug_gen, rank: int, device) -> None:
    """Restores what :func:`rng_tensors` saved: the data order from the start of the
    checkpoint's epoch, and this rank's augmentation stream (a rank the checkpoint did not
    have keeps its fresh seed)."""
    torch.set_rng_state(ckpt.tensors["rng.torch_cpu"])
    if device.type == "cuda" and "rng.cuda" in ckpt.tensors:
        torch.cuda.set_rng_state(ckpt.tensors["rng.cuda"], device)
    data_gen.set_state(ckpt.tensors["rng.data_epoch_start"])
    own = "rng.augment" if rank == 0 else f"rng.augment.r{rank}"
    if own in ckpt.tensors:
        aug_gen.set_state(ckpt.tensors[own])
