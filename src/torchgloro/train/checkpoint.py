"""Resumable training checkpoints: ``checkpoint.safetensors`` + ``checkpoint.json``.

``checkpoint.safetensors`` holds every tensor: the model under ``model.`` (so that
:func:`torchgloro.load` can read the file), the optimizer state under ``optim.``, RNG states
under ``rng.`` and loop accumulators under ``state.``. ``checkpoint.json`` holds the rest:
the epoch and step, the optimizer's param groups and non-tensor state, the best result so far
and the config. Each file is written atomically (temp file, fsync, rename, folder fsync), and
the pair so that a kill at any point leaves one whole pair (:func:`write_checkpoint`); both
record the epoch and step, and :func:`read_checkpoint` refuses a pair that still disagrees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchgloro import io
from torchgloro._errors import CheckpointError, ConfigError
from torchgloro._weights import TRAIN_KEY as _META_KEY
from torchgloro.gloro import GloroNet
from torchgloro.train.build import absolute_npz
from torchgloro.train.config import RESUME_OVERRIDABLE, config_to_dict, saved_run_config

__all__ = [
    "TENSORS_FILE",
    "JSON_FILE",
    "FORMAT",
    "Checkpoint",
    "write_checkpoint",
    "read_checkpoint",
    "restore_model",
    "optimizer_tensors",
    "restore_optimizer",
    "check_same_run",
    "arithmetic_changes",
    "check_val_indices",
    "RESUME_OVERRIDABLE",
]

TENSORS_FILE = "checkpoint.safetensors"
JSON_FILE = "checkpoint.json"
NEXT_JSON_FILE = "checkpoint.json.next"  # the JSON of a pair being written (see below)
FORMAT = "torchgloro-train/1"
# Of the keys that may change on resume (config.RESUME_OVERRIDABLE), those that change how the
# same math is rounded (how sums are split across threads, which kernels run): a resume with
# another value continues the same run, but not bit for bit.
RESUME_ARITHMETIC = (
    "run.device",
    "run.threads",
    "run.channels_last",
    "run.compile",
    "run.compile_mode",
    "run.compile_backend",
)
# The tensors every checkpoint has (a rank > 0 of a DDP run has its own augment state).
_REQUIRED_RNG = ("rng.torch_cpu", "rng.data", "rng.data_epoch_start", "rng.augment")


@dataclass
class Checkpoint:
    """A checkpoint read back from a run folder."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]  # the JSON file
    model_spec: dict[str, Any] | None  # from the safetensors metadata

    @property
    def epoch(self) -> int:
        return int(self.info["epoch"])

    @property
    def step(self) -> int:
        return int(self.info["step"])

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits ``optimizer.state_dict()`` into tensors (``optim.<i>.<key>``) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _json_value(v: Any) -> Any:
    """A param group's value for JSON: tuples (betas) as lists, a 0-dim tensor (the compiled
    step's learning rate) as its float."""
    if isinstance(v, tuple):
        return list(v)
    return v.item() if isinstance(v, torch.Tensor) else v


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Loads the optimizer state written by :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in ckpt.prefixed("optim.").items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    info = ckpt.info["optim"]
    for idx, scalars in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]
    ]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"The optimizer state in the checkpoint does not fit this optimizer ({e}); was it "
            f"written with another optim.name or model?"
        ) from e


def write_checkpoint(
    run_dir: Path,
    net: GloroNet,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any],
    fresh_bound: bool,
) -> None:
    """Writes the checkpoint pair so that an interruption at any point leaves one whole pair.

    Three atomic steps: the new JSON as ``checkpoint.json.next``, then the tensors over the
    old ones, then the JSON renamed into place. Killed after the second step, the tensors
    are new and the JSON old: :func:`read_checkpoint` completes the third step from
    ``.next``. Killed before it, the old pair is whole and ``.next`` is dropped.

    Args:
        run_dir: The run folder.
        net: The model; saved under ``model.``.
        tensors: Further tensors, already prefixed (``optim.``, ``rng.``, ``state.``).
        info: JSON-able dict with at least ``epoch`` and ``step``.
        fresh_bound: Whether ``net``'s frozen Lipschitz constants match its weights. If not
            (a mid-epoch checkpoint), ``model._frozen_k_pen`` is saved as NaN so that
            :func:`torchgloro.load` recomputes it; the exact value is kept for resuming.
    """
    model = io.model_tensors(net)
    if not fresh_bound:
        key = io.MODEL_PREFIX + "_frozen_k_pen"
        tensors = {**tensors, "state.frozen_k_pen": model[key]}
        model[key] = torch.full_like(model[key], float("nan"))
    marker = {
        "epoch": int(info["epoch"]),
        "step": int(info["step"]),
        "config_digest": config_digest(info["config"]),
    }
    if "total_epochs" in info:  # for the description of the weights (torchgloro._weights)
        marker["total_epochs"] = int(info["total_epochs"])
    meta = {
        "torchgloro": json.dumps(io.gloro_metadata(net)),
        _META_KEY: json.dumps(marker),
    }
    text = json.dumps({"format": FORMAT, **info}, indent=2, allow_nan=True)
    io.atomic_write_bytes(run_dir / NEXT_JSON_FILE, text.encode())
    io.atomic_save_tensors(run_dir / TENSORS_FILE, {**model, **tensors}, meta)
    io.durable_replace(run_dir / NEXT_JSON_FILE, run_dir / JSON_FILE)


def _pending(run_dir: Path, marker: dict) -> str | None:
    """The text of ``checkpoint.json.next`` if it belongs to the tensors on disk (a write
    interrupted after replacing them; see :func:`write_checkpoint`), else None."""
    try:
        text = (run_dir / NEXT_JSON_FILE).read_text()
        info = json.loads(text)
        ours = (info["epoch"], info["step"]) == (marker.get("epoch"), marker.get("step"))
    except (OSError, ValueError, KeyError, TypeError):  # absent, or renamed meanwhile
        return None
    return text if ours else None


def read_checkpoint(run_dir: str | Path, settle: bool = False) -> Checkpoint:
    """Reads and cross-checks the checkpoint pair of a run folder.

    A write interrupted after the tensors were replaced is read from its pending JSON. With
    ``settle`` (only the process that holds the run's lock), the folder is also tidied: the
    pending JSON renamed into place, or dropped when it belongs to no tensors. Without it,
    nothing is changed on disk (other DDP ranks, or a reader beside a running job).

    Raises:
        CheckpointError: if a file is missing, corrupt, or the two disagree.
    """
    run_dir = Path(run_dir)
    t_path, j_path = run_dir / TENSORS_FILE, run_dir / JSON_FILE

    def require(p: Path) -> None:
        if not p.is_file():
            raise CheckpointError(
                f"Cannot resume from {run_dir}: {p.name} is missing. Pass a run folder written "
                f"by `gloro train` that has completed at least one checkpoint."
            )

    require(t_path)
    tensors, meta = io.read_safetensors(t_path)
    try:
        marker = json.loads(meta[_META_KEY])
        spec = json.loads(meta["torchgloro"]).get("model")
    except (KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{t_path} is not a training checkpoint (missing metadata {e}); it may be a model "
            f"file written by GloroNet.save, which cannot be resumed."
        ) from e
    pending = _pending(run_dir, marker)
    if settle:
        if pending is not None:
            io.durable_replace(run_dir / NEXT_JSON_FILE, j_path)
        else:
            (run_dir / NEXT_JSON_FILE).unlink(missing_ok=True)
        for tmp in run_dir.glob(".*.tmp"):  # killed atomic writes' temp files (io.atomic_*)
            tmp.unlink(missing_ok=True)
    if pending is None:
        require(j_path)
    try:
        info = json.loads(pending if pending is not None else j_path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format is {info.get('format')!r}, expected {FORMAT!r}")
        _check_fields(info)
    except (ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{j_path} is corrupt or not a training checkpoint ({e}).") from e
    if (marker.get("epoch"), marker.get("step")) != (info["epoch"], info["step"]):
        raise CheckpointError(
            f"{t_path.name} (epoch {marker.get('epoch')}, step {marker.get('step')}) and "
            f"{j_path.name} (epoch {info['epoch']}, step {info['step']}) disagree: the run was "
            f"interrupted while writing its checkpoint, so it cannot be resumed exactly."
        )
    digest = marker.get("config_digest")  # absent in checkpoints of older versions
    config = info["config"]
    if digest is not None and digest not in (config_digest(config), _filled_digest(config)):
        raise CheckpointError(
            f"The config in {j_path} is not the one {t_path.name} was written with: it was "
            f"edited, or the files come from different runs (another architecture or "
            f"settings), so the run would not continue as trained. Restore the run's own "
            f"files; change the keys a resume may change with --set "
            f"({', '.join(sorted(RESUME_OVERRIDABLE))})."
        )
    _check_tensors(tensors, info, t_path)
    return Checkpoint(tensors, info, spec)


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a config exactly as saved (canonical JSON): a later version of torchgloro,
    which fills keys an older config lacks with their defaults, still computes the digest the
    checkpoint was written with."""
    if not isinstance(config, dict):
        raise ValueError(f"its 'config' is not a training config: {type(config).__name__}")
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _filled_digest(config: dict[str, Any]) -> str | None:
    """The digest checkpoints written on 2026-12-07 stored: of the config with the defaults of
    the version reading it filled in (unstable once a key is added), accepted on resume."""
    try:
        full = config_to_dict(saved_run_config(config))
    except (ConfigError, AttributeError, TypeError, ValueError):
        return None
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


def _check_fields(info: Any) -> None:
    """Raises ValueError naming the first field of ``checkpoint.json`` that is missing or of
    the wrong type."""
    if not isinstance(info, dict):
        raise ValueError(f"expected a JSON object, got {type(info).__name__}")
    if info.get("format") != FORMAT:
        raise ValueError(f"format is {info.get('format')!r}, expected {FORMAT!r}")
    number = (int, float)
    want = {  # key: (types, what it must be, required)
        "epoch": ((int,), "an integer >= 0", True),
        "step": ((int,), "an integer >= 0", True),
        "config": ((dict,), "an object", True),
        "optim": ((dict,), "an object with param_groups", True),
        "best": ((dict,), "an object", True),
        "partial_seconds": (number, "a number", False),
        "world_size": ((int,), "an integer >= 1", False),
    }
    for key, (types, what, required) in want.items():
        if key not in info:
            if required:
                raise ValueError(f"missing {key!r}")
            continue
        v = info[key]
        bad = type(v) not in types or (type(v) is int and v < (key == "world_size"))
        if key == "optim" and not bad:
            bad = not isinstance(v.get("param_groups"), list)
        if bad:
            raise ValueError(f"{key!r} must be {what}, got {v!r}")


def _check_tensors(tensors: dict[str, torch.Tensor], info: dict, path: Path) -> None:
    """Raises unless the RNG states (and a mid-epoch checkpoint's sums) are all there."""
    need = [*_REQUIRED_RNG, *(["state.acc"] if info["step"] else [])]
    for name in need:
        t = tensors.get(name)
        if t is None or (name.startswith("rng.") and t.dtype != torch.uint8):
            got = "missing" if t is None else f"of dtype {t.dtype}, not uint8"
            raise CheckpointError(
                f"{path} is damaged: its tensor {name} is {got}, so the run cannot continue "
                f"exactly. Restore the file, or start a new run."
            )


def arithmetic_changes(now: dict, saved: dict) -> list[str]:
    """The keys of :data:`RESUME_ARITHMETIC` whose values differ between two configs (a key
    the saved config lacks counts as the value runs of that version had)."""
    saved = config_to_dict(saved_run_config(saved))
    return [
        key
        for key in RESUME_ARITHMETIC
        if now.get(key.split(".")[0], {}).get(key.split(".")[1])
        != saved.get(key.split(".")[0], {}).get(key.split(".")[1])
    ]


def restore_model(net: GloroNet, ckpt: Checkpoint, path: Path) -> None:
    """Loads the ``model.`` tensors into ``net``, refusing another architecture."""
    own = getattr(net.backbone, "gloro_spec", None)
    if own is not None and ckpt.model_spec is not None:
        diff = {
            k: (ckpt.model_spec.get(k), own.get(k))
            for k in set(own) | set(ckpt.model_spec)
            if ckpt.model_spec.get(k) != own.get(k)
        }
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items()
            )
            raise CheckpointError(
                f"{path} was written for another architecture ({detail}); resume it with the "
                f"config it was trained with."
            )
    state = ckpt.prefixed(io.MODEL_PREFIX)
    io.load_state_checked(net, state, path)
    if "state.frozen_k_pen" in ckpt.tensors:
        net._frozen_k_pen.copy_(ckpt.tensors["state.frozen_k_pen"])


def check_val_indices(ckpt: Checkpoint, indices: torch.Tensor, run_dir: Path) -> None:
    """Refuses to resume when the validation split drawn now is not the recorded one."""
    recorded = ckpt.tensors.get("data.val_indices", torch.empty(0, dtype=torch.long))
    if not torch.equal(recorded.to(indices), indices):
        raise CheckpointError(
            f"The validation split drawn now ({len(indices)} images) is not the one {run_dir} "
            f"recorded ({len(recorded)} images): the training split changed (another data "
            f"file or data.root?). Resume it with the data it was trained on."
        )


def check_same_run(now: dict, saved: dict, run_dir: Path) -> None:
    """Refuses to resume with a config that differs in a key that changes the run.

    A key the saved config lacks (a run from a version before the key existed) counts as
    the value such runs were trained with (:func:`saved_run_config`).
    """
    saved = config_to_dict(saved_run_config(saved))
    if "name" in saved.get("data", {}):  # a relative npz path of an older run, from here
        saved["data"]["name"] = absolute_npz(saved["data"]["name"])
    changed = sorted(
        f"{s}.{k}"
        for s in now.keys() | saved.keys()
        for k in now.get(s, {}).keys() | saved.get(s, {}).keys()
        if f"{s}.{k}" not in RESUME_OVERRIDABLE and now.get(s, {}).get(k) != saved.get(s, {}).get(k)
    )
    if changed:
        raise ConfigError(
            f"The config differs from the one {run_dir} was trained with ({', '.join(changed)}); "
            f"resume with the run's own config (gloro train --resume {run_dir})."
        )
