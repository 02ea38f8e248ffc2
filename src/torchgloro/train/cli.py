"""``gloro train [RECIPE | --config FILE.toml] [--set k=v ...] ...``"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from torchgloro._errors import CheckpointError, ConfigError
from torchgloro.schedules import scale_schedule
from torchgloro.train.config import (
    DEFAULT_RECIPE,
    RESUME_OVERRIDABLE,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    list_recipes,
    load_config,
    saved_run_config,
)

__all__ = ["add_arguments", "run", "config_from_args", "rescale_epochs", "RESUME_OVERRIDABLE"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "recipes: " + ", ".join(list_recipes()) + f"\n(default: {DEFAULT_RECIPE}; see "
        "docs/recipes.md). Resume an interrupted run with --resume RUN_DIR."
    )
    p.add_argument(
        "recipe", nargs="?", metavar="RECIPE", help="a packaged recipe name or a .toml path"
    )
    p.add_argument("--config", metavar="FILE.toml", help="a TOML config file")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set gloro.epsilon_train=0.5 (repeatable)",
    )  # fmt: skip
    p.add_argument("--data-dir", metavar="DIR", help="data root (data.root)")
    p.add_argument("--out", metavar="RUNS", help="folder for run folders (run.out)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="run.device")
    p.add_argument(
        "--epochs", type=int, metavar="N",
        help="run.epochs, with the recipe's ramps (x,y,e schedules, warm-ups) scaled to match",
    )  # fmt: skip
    p.add_argument("--download", action="store_true", help="download missing data files")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=float, default=None, help=argparse.SUPPRESS)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.data_dir is not None:
        out.append(f"data.root={args.data_dir}")
    if args.out is not None:
        out.append(f"run.out={args.out}")
    if args.device is not None:
        out.append(f"run.device={args.device}")
    if args.download:
        out.append("data.download=true")
    return out


def rescale_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` shortened or lengthened to ``epochs``, keeping its shape over the run.

    Schedules given as fractions of the run (``decay_to_X``, ``cosine``, ``log``) follow
    ``run.epochs`` by themselves; the lengths given in epochs are scaled by
    ``epochs / cfg.run.epochs``: the ramp ``e`` of ``x,y,e`` ε and λ schedules,
    ``optim.warmup_lr_epochs``, and ``optim.warmup_epochs`` (rounded to whole epochs).
    """
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}.")
    factor = epochs / cfg.run.epochs
    out = copy.deepcopy(cfg)
    out.run.epochs = epochs
    out.gloro.epsilon_schedule = scale_schedule(cfg.gloro.epsilon_schedule, factor)
    out.loss.lam_schedule = scale_schedule(cfg.loss.lam_schedule, factor)
    out.optim.warmup_lr_epochs = cfg.optim.warmup_lr_epochs * factor
    out.optim.warmup_epochs = round(cfg.optim.warmup_epochs * factor)
    return out


def resume_config(run_dir: str | Path, overrides: list[str]) -> TrainConfig:
    """The config a run was trained with (from its checkpoint), plus harmless overrides."""
    path = Path(run_dir) / "checkpoint.json"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"Cannot resume: {run_dir} is not a run folder.")
    try:
        cfg = saved_run_config(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(
            f"Cannot resume from {run_dir}: {path.name} is missing or corrupt, or its config "
            f"is not a training config ({e})."
        ) from e
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUME_OVERRIDABLE and _changes(cfg, item):
            raise ConfigError(
                f"Cannot change {key} when resuming: it would not continue the same run. "
                f"Changeable: {', '.join(sorted(RESUME_OVERRIDABLE))}."
            )
    return apply_overrides(cfg, overrides).validate()


def _changes(cfg: TrainConfig, item: str) -> bool:
    """Whether the override ``item`` gives another value than ``cfg`` has (``--epochs 40``
    on a 40-epoch run changes nothing, and is allowed on resume)."""
    return config_to_dict(apply_overrides(copy.deepcopy(cfg), [item])) != config_to_dict(cfg)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The resolved config: the recipe, ``--epochs`` (rescaling it), then flags and ``--set``."""
    overrides = _flag_overrides(args) + list(args.overrides)
    if args.resume:
        if args.recipe or args.config:
            raise ConfigError("--resume takes its config from the run folder; drop the recipe.")
        epochs = [] if args.epochs is None else [f"run.epochs={args.epochs}"]
        return resume_config(args.resume, epochs + overrides)
    if args.recipe and args.config:
        raise ConfigError("Pass a RECIPE or --config FILE, not both.")
    cfg = load_config(args.config or args.recipe)
    if args.epochs is not None:
        cfg = rescale_epochs(cfg, args.epochs)
    return apply_overrides(cfg, overrides).validate()


def run(args: argparse.Namespace) -> int:
    from torchgloro.train.loop import train

    cfg = config_from_args(args)
    result = train(
        cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress
    )
    codes = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report it
    return codes.get(result.interrupted or "", 0)
