"""The training loop: :func:`train` runs a :class:`~torchgloro.train.TrainConfig`.

Per epoch: warm-up epochs train f with standard cross-entropy, then the GloRo loss; ε, λ and
the learning rate follow their schedules per batch (t = epoch + batch / batches); the power
iterations run inside ``GloroNet.forward``. After each epoch the bound is converged
(``net.refresh()``) and the test split is certified (``mode="fast"``); at the end also with
``mode="sound"``. The run's state and each phase live in :class:`torchgloro.train._run.Run`;
this module holds the order of the phases (epochs, checkpoints, stop requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchgloro.gloro import GloroNet
from torchgloro.train import distributed as ddp
from torchgloro.train._run import Run
from torchgloro.train._runtime import StopFlag, TrainingDivergedError, resolve_device
from torchgloro.train.build import (
    LOSSES,
    OPTIMIZERS,
    Splits,
    build_net,
    evaluate,
    parse_lr,
    resolve_epsilons,
)
from torchgloro.train.config import TrainConfig

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "TrainingDivergedError",
    "TrainResult",
    "train",
    "evaluate",
    "build_net",
    "parse_lr",
    "resolve_epsilons",
]


@dataclass
class TrainResult:
    run_dir: Path | None
    epochs_done: int
    interrupted: str | None = None  # why training stopped early, if it did
    final: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_after: float | None = None,
    progress: bool = True,
    splits: Splits | None = None,
    net: GloroNet | None = None,
) -> TrainResult:
    """Trains a GloRo net as configured and writes a run folder (rank 0 only).

    Args:
        cfg: A validated config (for ``resume``, the run's own config).
        resume: A run folder to continue exactly from its checkpoint.
        stop_after: Stop (and checkpoint) once this many epochs are done (may be
            fractional); what a SIGINT does, at a chosen point. For tests.
        progress: Show the tqdm progress bar.
        splits: The data, in place of the config's ``[data]`` (``tg.train``).
        net: The net to train (in place), in place of the config's ``[model]``.

    Raises:
        TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    env = ddp.detect()
    device = resolve_device(cfg.run.device, env)
    ddp.setup(env, device)
    try:
        return _train(cfg, env, device, resume, stop_after, progress, splits, net)
    finally:
        ddp.teardown(env)


def _train(cfg, env, device, resume, stop_after, progress, splits, net) -> TrainResult:
    run = Run(cfg, env, device, splits, net)
    try:
        return _train_open_run(run, cfg, env, device, resume, stop_after, progress)
    finally:
        if run.log is not None:
            run.log.close()
        if run.lock is not None:
            run.lock.release()


def _train_open_run(run, cfg, env, device, resume, stop_after, progress) -> TrainResult:
    if not run.open(resume):
        return TrainResult(run.run_dir, run.start_epoch)
    total = cfg.run.epochs
    t_start = time.time()
    interrupted: str | None = None
    with StopFlag() as stop:
        for epoch in range(run.start_epoch, total):
            t0 = time.time()
            step = run.train_epoch(epoch, stop, stop_after, progress)
            if stop.requested and step < run.num_batches:  # mid-epoch: save exactly here
                run.save_mid_epoch(epoch, step)
                interrupted = stop.requested
                break
            run.end_epoch(epoch, t0)
            done = epoch + 1
            if stop_after is not None and done >= stop_after - 1e-9:
                stop.request("--stop-after")
            ddp.agree_on_stop(stop, env, device)  # every rank must agree on stopping here
            if done % cfg.run.checkpoint_every == 0 or done == total or stop.requested:
                run.save_checkpoint(done, 0, run.data_gen.get_state(), fresh=True)
                run.last_good = done
            if stop.requested and done < total:
                interrupted = stop.requested
                break

    result = TrainResult(run.run_dir, len(run.history), interrupted, history=run.history)
    if interrupted:
        run.report_stop(interrupted)
    else:
        result.final = run.finish(t_start)
    return result
