"""``gloro evaluate RUN``: VRA (sound and fast), PGD accuracy, certified-accuracy curve,
Lipschitz tightness and cost of a trained run; writes ``evaluation.json``/``.md`` and plots
into the run folder and prints the tables."""

from __future__ import annotations

import argparse

from torchgloro.evaluate.options import EvalOptions

__all__ = ["add_arguments", "run"]


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (or a .safetensors file)")
    parser.add_argument(
        "--epsilon", type=_positive_float, default=None,
        help="ℓ2 radius to evaluate at (default: config [gloro] epsilon_test, else the net's ε)",
    )  # fmt: skip
    parser.add_argument(
        "--attack", choices=["pgd", "none"], default="pgd",
        help="attack for the PGD accuracy (default pgd; 'none' skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--lower-bounds", action="store_true",
        help="optimize empirical global/local Lipschitz lower bounds (Appendix E; sized for "
        "minutes on a CPU: see docs/evaluation.md)",
    )  # fmt: skip
    parser.add_argument(
        "--fallback", action="store_true",
        help="also certify ⊥ points with the sound local-bound fallback (costlier)",
    )  # fmt: skip
    parser.add_argument(
        "--cost", action="store_true",
        help="measure certification time/memory vs plain inference (Figure 3b)",
    )  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config/env)")
    parser.add_argument("--dataset", default=None, help="dataset name if config.toml lacks one")
    parser.add_argument(
        "--download", action="store_true", help="download the dataset if it is missing"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1...")
    parser.add_argument(
        "--limit", type=_positive_int, default=None, help="evaluate the first N test points"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed (default: config [run] seed, else 0)"
    )
    d = EvalOptions
    parser.add_argument("--pgd-steps", type=_positive_int, default=d.pgd_steps, help="PGD steps")
    parser.add_argument(
        "--pgd-restarts", type=_positive_int, default=d.pgd_restarts, help="PGD restarts"
    )
    parser.add_argument(
        "--pgd-step-size", type=_positive_float, default=None, help="default 2.5·ε/steps"
    )
    parser.add_argument(
        "--lower-bounds-points", type=_positive_int, default=d.lb_points, metavar="N",
        help="test points for the lower bounds: N pairs for the global one, N ε-balls for "
        "the local one (the paper: 100)",
    )  # fmt: skip
    parser.add_argument(
        "--lb-steps", type=_nonneg_int, default=d.lb_steps,
        help="global lower-bound optimizer steps (the paper: 7500)",
    )  # fmt: skip
    parser.add_argument("--lb-lr", type=_positive_float, default=d.lb_lr, help="its learning rate")
    parser.add_argument(
        "--local-steps", type=_nonneg_int, default=d.local_steps,
        help="local lower-bound steps (the paper: 5000)",
    )  # fmt: skip
    parser.add_argument(
        "--local-lr", type=_positive_float, default=d.local_lr, help="its learning rate"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="batch size")
    parser.add_argument(
        "--cost-repeats",
        type=_positive_int,
        default=d.cost_repeats,
        help="timing repeats for --cost",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of parsed arguments."""
    return EvalOptions(
        epsilon=args.epsilon,
        attack=None if args.attack == "none" else args.attack,
        lower_bounds=args.lower_bounds,
        fallback=args.fallback,
        cost=args.cost,
        limit=args.limit,
        seed=args.seed,
        pgd_steps=args.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        pgd_step_size=args.pgd_step_size,
        lb_points=args.lower_bounds_points,
        lb_steps=args.lb_steps,
        lb_lr=args.lb_lr,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        batch_size=args.batch_size,
        cost_repeats=args.cost_repeats,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from torchgloro.evaluate.runner import evaluate_run
    from torchgloro.evaluate.stopping import EXIT_CODES, Interrupted, signals_stop

    try:
        with signals_stop():
            result = evaluate_run(
                args.run,
                options_from_args(args),
                data_dir=args.data_dir,
                dataset=args.dataset,
                device=args.device,
                write=not args.no_write,
                download=args.download,
            )
    except KeyboardInterrupt as e:
        stop = Interrupted.of(e)
        if stop.result is not None:
            _print(stop.result, args.no_write)
        else:
            print(f"\nStopped ({stop.signal}); no results to write.")
        return EXIT_CODES[stop.signal]
    _print(result, args.no_write)
    return 0


def _print(result: dict, no_write: bool) -> None:
    from torchgloro.evaluate import report

    partly = " (partly: stopped)" if "stopped" in result else ""
    print(
        f"Evaluated{partly} {result['run']} on {result['dataset']} ({result['n']} test points, "
        f"ε = {result['epsilon']:g}, seed {result['seed']})\nWeights: {result['weights']}\n"
    )
    print(report.summary_tables(result))
    if no_write:
        return
    files = result.get("files", {})
    what = "the finished parts" if "stopped" in result else "the results"
    plots = " and plots" if "curve_png" in files else ""
    print(f"Wrote {what} to {files.get('json')}, {files.get('md')}{plots} in {files.get('folder')}")
