"""GloRo vs standard training epochs through the trainer itself: seconds per epoch, interleaved.

Where ``train_overhead`` times bare steps on resident data, this runs the trainer's own
``Run.train_epoch`` on a recipe's real data: augmentation, batching, the schedules, gradient
clipping and the optimizer included, exactly as ``gloro train`` does. Two runs of the same
recipe are built side by side in one process, one with ``gloro.robust = false`` and
``loss.name = ce`` (standard training of the same backbone: cross-entropy on f) and one as
the recipe says, and their epochs alternate (order rotated every round); the first epoch
of each is a warm-up.

    python -m benchmarks.epoch_overhead --recipe cifar10-6c2f-plus \\
        --data-dir ~/data/cifar10 --train-subset 10240 --rounds 5 --threads 2
"""

from __future__ import annotations

from typing import Any

from benchmarks import _common as C

TARGET = 1.10  # GloRo / standard seconds per epoch (issues 28 and 31)


def _run(recipe: str, overrides: list[str], device):
    from torchgloro.train import distributed as ddp
    from torchgloro.train._run import Run
    from torchgloro.train.config import load_config

    cfg = load_config(recipe, overrides)
    return Run(cfg, ddp.detect(), device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--recipe", default="cifar10-6c2f-plus")
    p.add_argument("--data-dir", default=None, help="the recipe's data root (data.root)")
    p.add_argument("--train-subset", type=int, default=10240, help="images per epoch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.quick:
        args.train_subset, args.rounds = min(args.train_subset, 1024), 2
    device = C.setup(args)
    from torchgloro.train._runtime import StopFlag

    common = [f"data.train_subset={args.train_subset}", "data.val_size=0", *args.overrides]
    if args.data_dir:
        common.append(f"data.root={args.data_dir}")
    runs = {
        "standard": _run(args.recipe, [*common, "gloro.robust=false", "loss.name=ce"], device),
        "gloro": _run(args.recipe, common, device),
    }
    first = runs["gloro"].cfg.optim.warmup_epochs  # epochs past the warm-up: the GloRo loss
    epoch = {k: first for k in runs}

    def one_epoch(name: str):
        def go() -> None:
            runs[name].train_epoch(epoch[name], StopFlag(), None, progress=False)
            epoch[name] += 1

        return go

    print(f"{args.recipe}: {args.train_subset} images/epoch, {args.rounds} rounds, "
          f"{runs['gloro'].num_batches} steps, {device}")  # fmt: skip
    times = C.interleave({k: one_epoch(k) for k in runs}, args.rounds, device, warmup=1)
    med = {k: C.median(v) for k, v in times.items()}
    ratio = med["gloro"] / med["standard"]
    print(f"  standard {med['standard']:.2f} s/epoch, gloro {med['gloro']:.2f} s/epoch, "
          f"ratio {ratio:.3f} (target <= {TARGET})")  # fmt: skip
    payload = {
        "recipe": args.recipe,
        "train_subset": args.train_subset,
        "steps_per_epoch": runs["gloro"].num_batches,
        "batch_size": runs["gloro"].cfg.run.batch_size,
        "power_iterations": runs["gloro"].cfg.gloro.power_iterations,
        "augment": runs["gloro"].cfg.data.augment,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "sec_per_epoch_all": times,
        "sec_per_epoch_median": med,
        "ratio_time": ratio,
        "target_ratio": TARGET,
    }
    compiled = "-compiled" if runs["gloro"].cfg.run.compile else ""
    C.write_result(f"epoch_overhead-{args.recipe}{compiled}", args, device, payload)
    return payload


if __name__ == "__main__":
    main()
