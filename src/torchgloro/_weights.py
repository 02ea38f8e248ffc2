"""Which weights a model file holds, in words: final, best on validation, or picked on test.

A run folder holds ``checkpoint.safetensors`` (the last checkpoint: the final weights once
training has finished) and ``best.safetensors`` (the epoch with the best VRA on the
selection split). Both record how they were chosen in their safetensors metadata;
:func:`describe_weights` turns that into the line every command prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["SELECTION_KEY", "TRAIN_KEY", "WeightsInfo", "describe_weights"]

SELECTION_KEY = "torchgloro.selection"  # best.safetensors: how its epoch was chosen
TRAIN_KEY = "torchgloro.train"  # checkpoint.safetensors: its epoch and step


@dataclass(frozen=True)
class WeightsInfo:
    """How the weights in a model file were chosen.

    Attributes:
        text: One line for people, naming the file, the epoch and the split it was chosen on.
        picked_on_test: Whether the epoch was chosen on the test split (figures on that split
            are then optimistic).
    """

    text: str
    picked_on_test: bool = False


def _json(meta: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _get(d: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """``d[key]`` if it has the JSON type ``kind`` (a model file is untrusted input), else
    None."""
    value = d.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def describe_weights(name: str, meta: dict[str, str]) -> WeightsInfo:
    """Describes the weights of the model file ``name`` from its safetensors metadata."""
    chosen, marker = _json(meta, SELECTION_KEY), _json(meta, TRAIN_KEY)
    if chosen:
        split = "validation" if _get(chosen, "split", str) == "validation" else "test"
        eps = _get(chosen, "epsilon", (int, float))
        text = (
            f"{name}: epoch {_get(chosen, 'epoch', int)} of {_get(chosen, 'total_epochs', int)}, "
            f"the best VRA{'' if eps is None else f'@{eps:g}'} on the {split} split "
            f"({_get(chosen, 'n', int)} images)"
        )
        if split != "test":
            return WeightsInfo(text)
        return WeightsInfo(f"{text}: picked on the test split, so its test figures are "
                           f"optimistic", True)  # fmt: skip
    epoch, step = _get(marker, "epoch", int), _get(marker, "step", int)
    if epoch is not None:
        total = _get(marker, "total_epochs", int)
        if step:
            return WeightsInfo(f"{name}: the weights at epoch {epoch + 1}, step {step} "
                               f"(a stopped run)")  # fmt: skip
        if total is not None and epoch >= total:
            return WeightsInfo(f"{name}: the final weights (epoch {epoch} of {total})")
        of = f" of {total}" if total is not None else ""
        return WeightsInfo(f"{name}: the weights after epoch {epoch}{of}")
    if name == "best.safetensors":  # written before selections were recorded: on test
        return WeightsInfo(
            f"{name}: the epoch with the best test VRA (a run from before validation "
            f"splits): picked on the test split, so its test figures are optimistic; "
            f"checkpoint.safetensors holds the final weights",
            True,
        )
    return WeightsInfo(f"{name}: a saved model")
