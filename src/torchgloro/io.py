"""Saving and loading GloRo nets: safetensors for tensors, JSON metadata, never pickle."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torchgloro._errors import CheckpointError, GloroInputError, InputShapeError
from torchgloro._model_file import (
    FORMAT,
    build_backbone,
    check_sizes,
    metadata_digest,
    read_settings,
    verify_frozen_bound,
)
from torchgloro._weights import SELECTION_KEY, describe_weights
from torchgloro.gloro import GloroNet

__all__ = [
    "save_gloro",
    "load",
    "resolve_model_file",
    "atomic_write_bytes",
    "atomic_save_tensors",
    "durable_replace",
    "FORMAT",
]

MODEL_PREFIX = "model."


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp's temp files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()
_RUN_FILES = ("best.safetensors", "checkpoint.safetensors", "model.safetensors")


def durable_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace(src, dst)``, then an fsync of the folder so that the rename itself
    survives a power loss (POSIX; where a folder cannot be opened or synced, e.g. on Windows,
    the rename is still atomic but not forced to disk)."""
    os.replace(src, dst)
    try:
        fd = os.open(Path(dst).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        durable_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file`` made atomic (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        except SafetensorError as e:  # a full disk, as safetensors reports it (not an OSError)
            code = re.search(r"code: (\d+)", str(e))
            if code:
                raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
            raise OSError(f"cannot write {path}: {e}") from e
        with open(tmp, "rb") as f:  # on disk before the rename makes it the file
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        durable_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gloro_metadata(net: GloroNet) -> dict[str, Any]:
    """The JSON-able description :func:`load` needs to rebuild ``net``."""
    spec = getattr(net.backbone, "gloro_spec", None)
    info = {
        "format": FORMAT,
        "model": spec,
        "gloro": {
            "epsilon": net.epsilon,
            "in_shape": list(net.in_shape),
            "power_iterations": net.power_iterations,
            "lipschitz": net.lipschitz,
        },
    }
    return {**info, "digest": metadata_digest(info)}


def model_tensors(net: GloroNet) -> dict[str, torch.Tensor]:
    """The net's state dict (weights, power-iteration iterates, frozen bounds), prefixed."""
    return {MODEL_PREFIX + k: v for k, v in net.state_dict().items()}


def save_gloro(
    net: GloroNet, path: str | os.PathLike, selection: dict[str, Any] | None = None
) -> None:
    """Saves ``net`` to one ``.safetensors`` file, atomically, with JSON metadata.

    Args:
        net: The net.
        path: The file.
        selection: How these weights were chosen (``best.safetensors``: epoch, split, ...),
            recorded for :func:`torchgloro._weights.describe_weights`.
    """
    if net.is_stale:
        net.refresh()
    meta = {"torchgloro": json.dumps(gloro_metadata(net))}
    if selection is not None:
        meta[SELECTION_KEY] = json.dumps(selection)
    atomic_save_tensors(path, model_tensors(net), meta)


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model file of a run folder (best, else checkpoint, else model), or ``path`` itself.

    Raises:
        CheckpointError: the folder has no model file, or the file does not exist.
    """
    path = Path(path)
    if path.is_dir():
        for name in _RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"No model file in {path}: expected one of {', '.join(_RUN_FILES)}. Pass the "
            f"run folder written by `gloro train`, or a file written by GloroNet.save."
        )
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}.")
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with clear errors if corrupt."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Cannot read {path}: the file is corrupt or not a safetensors file ({e}). "
            f"Restore it from a backup or retrain."
        ) from e
    return tensors, meta


def load(
    path: str | os.PathLike,
    backbone: torch.nn.Module | None = None,
    map_location: str = "cpu",
    *,
    warn: bool = True,
) -> GloroNet:
    """Loads a GloRo net saved by :meth:`GloroNet.save` or a ``gloro train`` run folder.

    Args:
        path: A ``.safetensors`` file, or a run folder (``best.safetensors`` is preferred).
        backbone: The backbone to load into, for models not built by ``create_model``.
        map_location: Device for the tensors.
        warn: Warn when the weights were picked on the test split (commands that print
            ``net.loaded_weights`` themselves pass False).

    Returns:
        The net in eval mode, with its frozen Lipschitz constants. ``net.loaded_weights``
        (a :class:`~torchgloro._weights.WeightsInfo`) says which weights these are: the
        final ones, the best epoch on the validation split, or one picked on the test split
        (which also warns, as test figures of such weights are optimistic).

    Raises:
        CheckpointError: if the file is missing, corrupt, or of another architecture.
    """
    path = resolve_model_file(Path(path))
    tensors, meta = read_safetensors(path)
    g = read_settings(meta, path)  # every field checked before anything is built
    if backbone is None:
        if g.spec is None:
            raise CheckpointError(
                f"{path} holds a custom backbone; pass it: torchgloro.load(path, backbone=...)."
            )
        backbone = build_backbone(g, tensors, MODEL_PREFIX, path)
    else:
        check_sizes(backbone, g.in_shape, path)
    try:
        net = GloroNet(backbone, g.epsilon, g.in_shape, g.power_iterations, g.lipschitz)
    except InputShapeError as e:  # the backbone cannot even run on the saved input shape
        raise CheckpointError(
            f"{path} does not match this architecture: the backbone fails on the saved input "
            f"shape {g.in_shape} ({e}). Load it with the architecture it was trained with."
        ) from e
    except GloroInputError as e:  # e.g. an epsilon out of range in the metadata
        raise CheckpointError(f"{path} has invalid settings in its metadata: {e}") from e
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    saved = net.epsilon  # the metadata's ε, checked and stored by the constructor
    load_state_checked(net, state, path)
    if net.epsilon != saved:
        raise CheckpointError(
            f"{path} is inconsistent: its metadata says epsilon={g.epsilon!r} but its "
            f"tensors hold {net.epsilon!r} (the file was modified). Re-save the model."
        )
    verify_frozen_bound(net, path)
    net.to(map_location).eval()
    if not torch.isnan(net._frozen_k_pen):
        net._frozen_at = net._fingerprint()
    net.loaded_weights = describe_weights(path.name, meta)
    if warn and net.loaded_weights.picked_on_test:
        warnings.warn(f"{path.parent}/{net.loaded_weights.text}.", UserWarning, stacklevel=2)
    return net


def load_state_checked(net: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped tensor."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    dtypes = [  # a cast would load other values than the file's (I32 read as F32, ...)
        f"{k}: checkpoint {state[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in state and state[k].dtype != own[k].dtype
    ]
    if missing or unexpected or shapes or dtypes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {shapes[:5]}" if shapes else "",
                f"dtype mismatch {dtypes[:5]}" if dtypes else "",
            )
            if part
        )
        raise CheckpointError(
            f"{path} does not match this architecture ({detail}). It was saved from another "
            f"model or config: load it with the architecture it was trained with."
        )
    net.load_state_dict(state)
