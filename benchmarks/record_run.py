"""Record a finished training run and its evaluation as a result JSON with provenance.

    python -m benchmarks.record_run RUN_DIR --name mnist-2c2f-gloro-cpu \
        --train-command "gloro train mnist-2c2f-gloro --data-dir ../shared/data/mnist" \
        --eval-command "gloro evaluate RUN_DIR --lower-bounds --cost --fallback"

Reads ``config.toml``, ``metrics.csv`` and ``evaluation.json`` from the run folder (run
``gloro evaluate`` first; a timing run without one is recorded with ``"evaluation": null``
and a ``--note``) and writes ``benchmarks/results/<name>.json``: the commands, the git
commit the run was trained at (``--commit``, default: the current one), the device, the date,
the wall time of training, and the metrics of ``gloro evaluate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from benchmarks import _common as C

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(run: Path, evaluation_file: str = "evaluation.json") -> dict:
    """The training config, per-epoch totals and the evaluation of one run folder."""
    cfg = tomllib.loads((run / "config.toml").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows]
    ev_path = run / evaluation_file
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    return {
        "run": run.name,
        "recipe": cfg["run"]["name"],
        "config": cfg,
        "epochs": len(rows),
        "train_seconds_total": sum(seconds),
        "sec_per_epoch_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "final_epoch": rows[-1] if rows else None,
        "evaluation": None
        if evaluation is None
        else {
            k: evaluation.get(k)
            for k in ("weights", "epsilon", "n", "metrics", "lipschitz", "fallback", "cost", "pgd")
        },
    }


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--name", required=True, help="result file name (without .json)")
    p.add_argument("--train-command", required=True)
    p.add_argument("--eval-command", default=None, help="omit for a run without evaluation")
    p.add_argument(
        "--evaluation",
        default="evaluation.json",
        help="evaluation file in RUN (e.g. evaluation-first100.json from `--limit 100`)",
    )
    p.add_argument("--note", default=None, help="what the figure is (and is not)")
    p.add_argument("--commit", default=None, help="commit the run was trained at")
    p.add_argument("--device", default=None, help="device description (default: this CPU)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = p.parse_args(argv)
    if (args.run / args.evaluation).is_file() and args.eval_command is None:
        p.error(f"{args.run} has an {args.evaluation}: say how it was made with --eval-command.")
    if args.eval_command is not None and not (args.run / args.evaluation).is_file():
        p.error(f"{args.run} has no {args.evaluation}: run `gloro evaluate` first.")
    payload = {
        "command": " ".join(["python", "-m", "benchmarks.record_run", *sys.argv[1:]]),
        "train_command": args.train_command,
        "eval_command": args.eval_command,
        "git_commit": args.commit or C._git_commit(),
        "device": args.device or f"cpu: {C._cpu_model()}",
        **({"note": args.note} if args.note else {}),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **summarize(args.run, args.evaluation),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
