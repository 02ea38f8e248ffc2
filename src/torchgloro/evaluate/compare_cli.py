"""``gloro compare RUN1 RUN2 ...``: side-by-side markdown table of evaluated runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torchgloro._errors import CheckpointError, ConfigError

__all__ = ["add_arguments", "run", "load_evaluation"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN",
        help="run folders (with evaluation.json from `gloro evaluate`) or evaluation.json files",
    )  # fmt: skip
    parser.add_argument(
        "--names", default=None, help="comma-separated labels, e.g. Standard,GloRo,GloRo-T"
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")


def load_evaluation(path: str | Path) -> dict:
    """The evaluation.json of a run folder, or the file itself (``evaluation-eps0.5.json``)."""
    p = Path(path)
    if p.is_dir():
        others = sorted(x.name for x in p.glob("evaluation-*.json"))
        p = p / "evaluation.json"
        if not p.is_file() and others:
            raise CheckpointError(
                f"No evaluation of the run's own model, ε and full test split at {p}, only "
                f"{', '.join(others)}: name one of those files, or run `gloro evaluate {path}`."
            )
    if not p.is_file():
        raise CheckpointError(f"No evaluation found at {p}: run `gloro evaluate {path}` first.")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"Cannot read {p}: {e}. Re-run `gloro evaluate`.") from e
    if not isinstance(data, dict) or "metrics" not in data:
        raise CheckpointError(
            f"{p} is not an evaluation written by `gloro evaluate` (no 'metrics'). Re-run it."
        )
    return data


def run(args: argparse.Namespace) -> int:
    from torchgloro.evaluate.report import compare_table

    results = [load_evaluation(r) for r in args.runs]
    names = None
    if args.names:
        names = [s.strip() for s in args.names.split(",")]
        if len(names) != len(results):
            raise CheckpointError(
                f"--names has {len(names)} labels for {len(results)} runs; give one per run."
            )
    else:
        names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in args.runs]
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and out.suffix not in (".md", ".txt"):
        raise ConfigError(
            f"--output {out} exists and is not a .md or .txt file (an evaluation, a model, a "
            f"config?): the table would replace it. Name a .md file."
        )
    table = compare_table(results, names)
    print(table)
    if args.output:
        try:
            Path(args.output).write_text(table + "\n")
        except OSError as e:
            raise ConfigError(f"Cannot write --output {args.output}: {e}.") from e
    return 0
