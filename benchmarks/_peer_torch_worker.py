"""torchgloro's side of ``benchmarks/peer_tf_gloro.py``: ``gloro train``'s own epoch, timed.

Builds the run of a recipe as ``gloro train RECIPE`` does (``torchgloro.train._run.Run``:
the recipe's split, net, optimizer, loss and schedules) and times ``Run.train_epoch`` for
the first epochs: the training steps, each with its power iterations, and the loop's
metric sums and host syncs, without the end-of-epoch refresh and certification (which the
TF side leaves out too). Threads: the parent pins this process to ``--threads`` CPUs and
sets ``OMP_NUM_THREADS``; ``torch.set_num_threads`` and ``set_num_interop_threads`` are set
here, before any op runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from torchgloro.train.config import TrainConfig, load_config


def recipe_config(recipe: str, data_root: str, threads: int, train_subset: int) -> TrainConfig:
    """The recipe's config on the CPU, reading ``data_root``; ``train_subset`` 0 = all."""
    return load_config(
        recipe,
        [
            "run.device=cpu",
            f"run.threads={threads}",
            f"data.root={data_root}",
            f"data.train_subset={train_subset}",
        ],
    )


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="where this worker writes its JSON record")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    from torchgloro.train import distributed as ddp
    from torchgloro.train._run import Run
    from torchgloro.train._runtime import StopFlag

    cfg = recipe_config(args.recipe, args.data_root, args.threads, args.train_subset)
    run = Run(cfg, ddp.detect(), torch.device("cpu"))
    seconds = []
    with StopFlag() as stop:
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            run.train_epoch(epoch, stop, None, progress=False)
            seconds.append(time.perf_counter() - t0)
    sums = run.acc.tolist()  # loss·n, clean, vra, n of the last epoch
    record = {
        "side": "torchgloro",
        "epoch_seconds": seconds,
        "train_samples": len(run.train_split),
        "steps_per_epoch": run.num_batches,
        "final_loss": sums[0] / sums[3],
        "binding": {
            "cpus": sorted(os.sched_getaffinity(0)),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    Path(args.out).write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
