"""torchgloro vs the TF original (gloro 1.1.1): seconds per training epoch, same model and data.

The recipe ``mnist-2c2f-gloro`` (2C2F, ReLU, Glorot init, batch 256, 10 power iterations per
step, ε_train 0.45, Adam lr 1e-3 with Keras' betas and eps, cross-entropy on the C+1 GloRo
logits), trained on the recipe's own training split (55,000 MNIST images, the 5,000
validation images held out) by both:

* **TF gloro**: ``GloroNet.fit`` on the arrays in memory, in the peer venv made by
  ``benchmarks/peer_tf_gloro_setup.sh`` (worker: ``benchmarks/_peer_tf_worker.py``);
* **torchgloro**: ``gloro train``'s own ``Run.train_epoch`` (worker:
  ``benchmarks/_peer_torch_worker.py``).

Each worker is a fresh process that trains two epochs and times each; the second epoch is
the figure (the first traces TF's graph and warms up both). For each thread count, the two
sides' processes alternate ``--reps`` times (the side that starts swaps every round); each
process is pinned to that many CPUs, with ``OMP_NUM_THREADS`` and the framework's own thread
pools set to the count. Reports per-process seconds, medians and torchgloro / TF (target
≤ 0.6, issue 31). Only the training steps are timed, on both sides: not the convergence of
the bound between epochs nor any evaluation.

    bash benchmarks/peer_tf_gloro_setup.sh        # once: the peer venv (~5 min, 1.5 GB)
    python -m benchmarks.peer_tf_gloro [--quick] [--threads 1 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import torchgloro
from benchmarks import _common as C
from benchmarks._peer_torch_worker import recipe_config

RECIPE = "mnist-2c2f-gloro"
PEER_PYTHON = Path(
    os.environ.get("TORCHGLORO_PEER_PYTHON")
    or Path.home() / ".cache" / "torchgloro-peer" / "venv" / "bin" / "python"
)
SIDES = ("tf_gloro", "torchgloro")
EPOCHS, TIMED_EPOCH = 2, 1  # each process trains 2 epochs; the second (index 1) is timed
QUICK_SUBSET = 2560  # --quick: 10 steps per epoch
TARGET = 0.6  # torchgloro epoch / TF gloro epoch, at each thread count


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--quick`` means one round on a small subset."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SUBSET} images, 1 rep")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    p.add_argument("--reps", type=int, default=3, help="processes per side and thread count")
    p.add_argument("--peer-python", default=str(PEER_PYTHON), help="the peer venv's python")
    p.add_argument("--out-dir", default=str(C.RESULTS), help="where the JSON goes")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
    cpus = len(os.sched_getaffinity(0))
    if args.reps < 1 or any(not 1 <= n <= cpus for n in args.threads):
        p.error(f"--reps must be >= 1 and each --threads count in 1..{cpus} (CPUs available)")
    args.device = "cpu"  # for _common's provenance and file name
    return args


def _tf_options(cfg) -> list[str]:
    """The recipe's hyper-parameters as the TF worker's flags: one source for both sides."""
    o = cfg.optim
    got = (cfg.model.arch, cfg.model.activation, cfg.loss.name, o.name)
    if got != ("2c2f", "relu", "ce", "adam"):
        raise SystemExit(f"{RECIPE}: the TF worker builds 2c2f/relu/ce/adam only, got {got}")
    return [
        "--batch-size", str(cfg.run.batch_size),
        "--power-iterations", str(cfg.gloro.power_iterations),
        "--epsilon", str(cfg.gloro.epsilon_train),
        "--lr", str(o.lr), "--betas", *map(str, o.betas), "--adam-eps", str(o.eps),
        "--seed", str(cfg.run.seed),
    ]  # fmt: skip


def _write_split(cfg, folder: Path) -> None:
    """The recipe's training split as ``x.npy`` (N, H, W, C) float32 and ``y.npy``."""
    from torchgloro.train import distributed as ddp
    from torchgloro.train.build import load_splits

    train = load_splits(cfg, ddp.detect()).train
    np.save(folder / "x.npy", train.x.permute(0, 2, 3, 1).contiguous().numpy())
    np.save(folder / "y.npy", train.y.numpy())


def _torch_env() -> dict[str, str]:
    """This environment, with the torchgloro imported here and the benchmarks importable."""
    src = str(Path(torchgloro.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(C.REPO)])}


def _spawn(cmd: list[str], threads: int, env: dict[str, str], log: Path, out: Path) -> dict:
    """Runs one worker pinned to ``threads`` CPUs; returns the JSON record it writes."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as f:
        done = subprocess.run(
            cmd, cwd=C.REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip
    if done.returncode != 0 or not out.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"worker failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(out.read_text())


def summarize(records: list[dict], target: float = TARGET) -> list[dict]:
    """Per thread count: each side's timed-epoch seconds per process, medians, the ratio.

    Args:
        records: Worker records, each with ``threads`` and ``side`` added.
        target: The ratio torchgloro / TF gloro to meet.

    Raises:
        RuntimeError: the two sides trained on different numbers of images.
    """
    out = []
    for n in sorted({r["threads"] for r in records}):
        row: dict = {"threads": n}
        for side in SIDES:
            mine = [r for r in records if r["threads"] == n and r["side"] == side]
            secs = [r["epoch_seconds"][TIMED_EPOCH] for r in mine]
            row[side] = {
                "epoch_seconds": secs,
                "median": C.median(secs),
                "first_epoch_seconds": [r["epoch_seconds"][0] for r in mine],
                "train_samples": mine[0]["train_samples"],
                "steps_per_epoch": mine[0]["steps_per_epoch"],
                "binding": mine[0]["binding"],
            }
        if row["tf_gloro"]["train_samples"] != row["torchgloro"]["train_samples"]:
            raise RuntimeError(f"the two sides trained on different data: {row}")
        row["ratio_torchgloro_over_tf"] = row["torchgloro"]["median"] / row["tf_gloro"]["median"]
        row["meets_target"] = row["ratio_torchgloro_over_tf"] <= target
        out.append(row)
    return out


def main(argv=None) -> dict:
    """Runs every worker, writes ``peer_tf_gloro-cpu[-quick].json``; returns its payload."""
    args = parse_args(argv)
    peer = Path(args.peer_python).expanduser()
    if not peer.exists():
        raise SystemExit(
            f"no peer venv python at {peer}: make it with `bash benchmarks/peer_tf_gloro_setup.sh`"
            f" (Python 3.11, tensorflow-cpu 2.15, gloro 1.1.1), or name one with --peer-python."
        )
    if not C.MNIST_ROOT.exists():
        raise SystemExit(f"MNIST not found at {C.MNIST_ROOT}; set BENCH_MNIST to its folder.")
    subset = QUICK_SUBSET if args.quick else 0
    cfg = recipe_config(RECIPE, str(C.MNIST_ROOT), 1, subset)
    torch_env = _torch_env()
    tf_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tf_env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    records = []
    with tempfile.TemporaryDirectory(prefix="peer_tf_gloro-") as tmp:
        tmp = Path(tmp)
        _write_split(cfg, tmp)
        for rep in range(args.reps):
            for n in args.threads:
                for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                    out = tmp / f"{side}-{n}-{rep}.json"
                    common = ["--out", str(out), "--threads", str(n), "--epochs", str(EPOCHS)]
                    if side == "tf_gloro":
                        cmd = [str(peer), str(Path(__file__).with_name("_peer_tf_worker.py"))]
                        cmd += ["--data", str(tmp), *common, *_tf_options(cfg)]
                        env = tf_env
                    else:
                        cmd = [sys.executable, "-m", "benchmarks._peer_torch_worker"]
                        cmd += ["--recipe", RECIPE, "--data-root", str(C.MNIST_ROOT), *common]
                        cmd += ["--train-subset", str(subset)]
                        env = torch_env
                    rec = _spawn(cmd, n, env, tmp / f"{side}-{n}-{rep}.log", out)
                    records.append({"threads": n, "side": side, "rep": rep, **rec})
                    print(f"threads {n}, round {rep + 1}/{args.reps}, {side}: epoch seconds "
                          + ", ".join(f"{s:.2f}" for s in rec["epoch_seconds"]))  # fmt: skip
    results = summarize(records)
    for row in results:
        print(f"threads {row['threads']}: torchgloro {row['torchgloro']['median']:.2f} s, "
              f"TF gloro {row['tf_gloro']['median']:.2f} s, ratio "
              f"{row['ratio_torchgloro_over_tf']:.3f} (target <= {TARGET})")  # fmt: skip
    payload = {
        "recipe": RECIPE,
        "setup": {
            "arch": cfg.model.arch,
            "activation": cfg.model.activation,
            "init": cfg.model.init,
            "batch_size": cfg.run.batch_size,
            "power_iterations": cfg.gloro.power_iterations,
            "epsilon_train": cfg.gloro.epsilon_train,
            "loss": cfg.loss.name,
            "optimizer": {
                "name": cfg.optim.name,
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
            },
            "epochs_per_process": EPOCHS,
            "timed_epoch": TIMED_EPOCH + 1,
            "reps": args.reps,
        },
        "peer": next(r["versions"] for r in records if r["side"] == "tf_gloro"),
        "target": {"torchgloro_over_tf_epoch": TARGET},
        "results": results,
        "records": records,
        "notes": [
            "epoch_seconds: the second epoch of each fresh process, the training steps only "
            "(TF: on_epoch_begin to the end of the last step, fit(update_iterates=False); "
            "torchgloro: Run.train_epoch, without end_epoch's refresh and certification).",
            "Both sides train the recipe's training split from memory, batch 256 with the last "
            "partial batch, shuffled each epoch; each process is pinned to `threads` CPUs.",
            "first_epoch_seconds include TF's graph tracing and both sides' warm-up.",
        ],
    }
    C.write_result("peer_tf_gloro", args, torch.device("cpu"), payload, threads=args.threads)
    return payload


if __name__ == "__main__":
    main()
