"""What ``gloro certify`` and ``gloro evaluate`` read from a run folder's ``config.toml``.

A run folder written by ``gloro train`` holds its resolved config; a folder a user made by
hand (a model file and a recipe copied beside it) may hold anything. :func:`read_saved_run`
reads the few settings evaluation needs and checks their types, so a damaged or hand-edited
file gives a :class:`~torchgloro._errors.ConfigError` that names the key, not a traceback.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from torchgloro._errors import ConfigError
from torchgloro.train.config import read_toml

__all__ = ["SavedRun", "read_saved_run"]


@dataclass(frozen=True)
class SavedRun:
    """The evaluation settings of a run folder (None where ``config.toml`` has none)."""

    path: Path | None  # the config.toml read, if any
    dataset: str | None
    root: str | None
    epsilon_test: float | None  # None also for a value <= 0 ("the dataset's default")
    seed: int
    arch: str | None


def read_saved_run(run: str | os.PathLike) -> SavedRun:
    """Reads ``config.toml`` beside a run folder or model file.

    Args:
        run: A run folder, or a model file inside one.

    Raises:
        ConfigError: the file is not valid TOML, or a setting has the wrong type.
    """
    run = Path(run)
    path = (run if run.is_dir() else run.parent) / "config.toml"
    if not path.is_file():
        return SavedRun(None, None, None, None, 0, None)
    raw = read_toml(path)

    def table(name: str) -> dict:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: [{name}] must be a table, got {type(value).__name__} {value!r}. "
                f"Fix or remove the file (then pass --dataset and --epsilon)."
            )
        return value

    def typed(section: str, key: str, types: tuple[type, ...], what: str):
        value = table(section).get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(
                f"{path}: {section}.{key} must be {what}, got {value!r}. Fix the file, or "
                f"override it on the command line."
            )
        return value

    eps = typed("gloro", "epsilon_test", (int, float), "a number")
    if eps is not None and not math.isfinite(eps):
        raise ConfigError(f"{path}: gloro.epsilon_test must be finite, got {eps!r}.")
    seed = typed("run", "seed", (int,), "an integer")
    return SavedRun(
        path=path,
        dataset=typed("data", "name", (str,), "a dataset name") or None,
        root=typed("data", "root", (str,), "a folder path") or None,
        epsilon_test=float(eps) if eps is not None and eps > 0 else None,
        seed=int(seed or 0),
        arch=typed("model", "arch", (str,), "an architecture name"),
    )
