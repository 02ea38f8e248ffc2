"""``gloro evaluate RUN``: VRA (sound and fast), PGD accuracy, certified-accuracy curve,
Lipschitz tightness and cost of a trained run; writes ``evaluation.json``/``.md`` and plots
into the run folder and prints the tables."""

from __future__ import annotations

import argparse

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
        help="optimize empirical global/local Lipschitz lower bounds (Appendix E)",
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
    parser.add_argument("--pgd-steps", type=_positive_int, default=100, help="PGD steps")
    parser.add_argument("--pgd-restarts", type=_positive_int, default=1, help="PGD restarts")
    parser.add_argument(
        "--pgd-step-size", type=_positive_float, default=None, help="default 2.5·ε/steps"
    )
    parser.add_argument(
        "--lb-steps", type=_nonneg_int, default=7500, help="global lower-bound optimizer steps"
    )
    parser.add_argument(
        "--lb-pairs", type=_positive_int, default=100, help="point pairs for the global bound"
    )
    parser.add_argument("--lb-lr", type=_positive_float, default=1e-3, help="its learning rate")
    parser.add_argument(
        "--local-steps", type=_nonneg_int, default=5000, help="local lower-bound steps"
    )
    parser.add_argument(
        "--local-points", type=_positive_int, default=100, help="points for the local bound"
    )
    parser.add_argument("--local-lr", type=_positive_float, default=1e-3, help="its learning rate")
    parser.add_argument("--batch-size", type=_positive_int, default=512, help="batch size")
    parser.add_argument(
        "--cost-repeats", type=_positive_int, default=3, help="timing repeats for --cost"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace):
    """The :class:`EvalOptions` of parsed arguments."""
    from torchgloro.evaluate.runner import EvalOptions

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
        lb_steps=args.lb_steps,
        lb_pairs=args.lb_pairs,
        lb_lr=args.lb_lr,
        local_steps=args.local_steps,
        local_points=args.local_points,
        local_lr=args.local_lr,
        batch_size=args.batch_size,
        cost_repeats=args.cost_repeats,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from torchgloro.evaluate import report
    from torchgloro.evaluate.runner import evaluate_run

    result = evaluate_run(
        args.run,
        options_from_args(args),
        data_dir=args.data_dir,
        dataset=args.dataset,
        device=args.device,
        write=not args.no_write,
        download=args.download,
    )
    print(
        f"Evaluated {result['run']} on {result['dataset']} ({result['n']} test points, "
        f"ε = {result['epsilon']:g}, seed {result['seed']})\nWeights: {result['weights']}\n"
    )
    print(report.summary_tables(result))
    if not args.no_write:
        files = result.get("files", {})
        print(f"Wrote {files.get('json')}, {files.get('md')} and plots into {files.get('folder')}")
    return 0
