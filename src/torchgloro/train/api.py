"""``tg.train(model, data, epsilon=...)``: the loop of ``gloro train`` on your own model and
in-memory data.

The run goes through the same :class:`~torchgloro.train._run.Run` as ``gloro train`` (the
GloRo loss, the ε, λ and learning-rate schedules, the power iterations, the per-epoch
validation VRA, the final sound evaluation); only the data and the model come from the
arguments instead of the config's ``[data]`` and ``[model]`` tables.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchgloro._errors import ConfigError, GloroInputError
from torchgloro.data import DatasetInfo, Split, as_tensors
from torchgloro.gloro import GloroNet
from torchgloro.losses import check_labels
from torchgloro.train.build import Splits, hold_out, wrap_backbone
from torchgloro.train.cli import rescale_epochs
from torchgloro.train.config import TrainConfig, config_from_dict, load_config
from torchgloro.train.loop import TrainResult
from torchgloro.train.loop import train as train_config

__all__ = ["train"]

_DATA_NAME = "in-memory"


def train(
    model: nn.Module,
    data: Any,
    *,
    epsilon: float,
    epochs: int | None = None,
    val: Any = None,
    test: Any = None,
    batch_size: int | None = None,
    lr: float | None = None,
    config: TrainConfig | str | None = None,
    settings: Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[GloroNet, TrainResult]:
    """Trains ``model`` as a GloRo net on ``data``; ``tg.train(...)``.

    Args:
        model: A backbone (wrapped in a :class:`~torchgloro.GloroNet` with the config's
            ``[gloro]`` settings) or a GloroNet, trained in place.
        data: The training data: an ``(x, y)`` pair of tensors, a ``TensorDataset``, a
            :class:`~torchgloro.data.Split` or a Dataset of ``(x, y)`` pairs. ``x`` is
            float ``(N, *in_shape)``; ``y`` holds class indices.
        epsilon: The ℓ2 radius to certify (``gloro.epsilon_test``; also trained at unless
            ``settings`` sets ``gloro.epsilon_train``).
        epochs: Epochs (default: the config's); a recipe's ramps are scaled to match, as
            ``gloro train --epochs`` does.
        val: Validation data (per-epoch VRA, ``best.safetensors``): data as ``data`` is, or
            an int to hold out that many examples of ``data`` (drawn with ``run.seed``).
        test: Test data, certified (fast and sound) at the end, as ``data`` is.
        batch_size: ``run.batch_size`` (default: the config's).
        lr: ``optim.lr`` (default: the config's).
        config: A recipe name, a TOML path or a :class:`TrainConfig` for the schedules, the
            loss and the optimizer (default: ``TrainConfig()``); its ``[data]`` and
            ``[model]`` tables do not apply, except ``data.augment``.
        settings: Further config values by dotted key, e.g. ``{"loss.name": "trades",
            "optim.lr_schedule": "cosine"}``.
        out: A folder for the run folder (metrics.csv, report.md, best.safetensors, the
            checkpoint); default: a temporary one, deleted at the end.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default: the config's, ``auto``);
            the data moves there.
        progress: Show the progress bar of each epoch.

    Returns:
        ``(net, result)``: the trained GloroNet (final weights, eval mode, at ``epsilon``)
        and a :class:`~torchgloro.train.TrainResult`: ``history`` (one dict per epoch, the
        columns of ``metrics.csv``), ``final`` (test figures, with ``test``), ``run_dir``
        (None without ``out``) and ``interrupted`` (Ctrl-C stops after the current step).

    Raises:
        ConfigError: an unknown or invalid setting, or one of ``[data]``/``[model]``.
        GloroInputError: data that is not (x, y), or does not fit the model.
    """
    cfg = _config(config, epochs, settings, {
        "gloro.epsilon_test": epsilon, "run.batch_size": batch_size, "optim.lr": lr,
        "run.device": device,
    }, type(model.backbone if isinstance(model, GloroNet) else model).__name__)  # fmt: skip
    net = model if isinstance(model, GloroNet) else None
    x, y = _tensors(data, "data")
    if net is None:
        net = wrap_backbone(cfg, model, x.shape[1:])
    cfg.gloro.power_iterations, cfg.gloro.lipschitz = net.power_iterations, net.lipschitz
    info = DatasetInfo(_DATA_NAME, tuple(map(str, range(net.num_classes))), tuple(x.shape[1:]),
                       float(epsilon))  # fmt: skip
    splits = _splits(net, info, Split(x, y, info), val, test, cfg.run.seed)
    cfg.model.arch, cfg.data.name = type(net.backbone).__name__, _DATA_NAME  # for the record
    cfg.data.val_size = len(splits.val) if splits.val is not None else 0
    if out is not None:
        cfg.run.out = os.fspath(out)
        return net, train_config(cfg, progress=progress, splits=splits, net=net)
    with tempfile.TemporaryDirectory(prefix="torchgloro-train-") as tmp:
        cfg.run.out = tmp
        result = train_config(cfg, progress=progress, splits=splits, net=net)
    print("The run folder was temporary and is deleted; pass out=FOLDER to keep one.")
    result.run_dir = None
    return net, result


def _config(config, epochs, settings, given: dict[str, Any], name: str) -> TrainConfig:
    """The validated config: ``config``, rescaled to ``epochs``, then ``settings`` and the
    keyword arguments (``given``; None = the config's); the run is called ``name`` unless
    ``settings`` names it."""
    if isinstance(config, TrainConfig):
        cfg = copy.deepcopy(config)
    else:
        cfg = load_config(config) if config is not None else TrainConfig()
    if epochs is not None:
        cfg = rescale_epochs(cfg, epochs)
    values = dict(settings or {})
    for key in values:
        section = key.partition(".")[0]
        if section in ("data", "model") and key != "data.augment":
            raise ConfigError(
                f"settings[{key!r}]: tg.train takes its data and model as arguments; pass "
                f"val=N to hold out N examples, and the model you want trained."
            )
    for key, value in given.items():
        if value is None:
            continue
        if key in values:
            raise ConfigError(f"{key} is given twice: as a keyword argument and in settings.")
        values[key] = value
    values.setdefault("run.name", name)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return config_from_dict(nested, base=cfg).validate()


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``data``, with float inputs and int64 labels."""
    x, y = as_tensors(data, what=f"tg.train's {what}")
    if not x.is_floating_point():
        raise GloroInputError(
            f"tg.train's {what}: x must be floating point, got {x.dtype}; e.g. images as "
            f"x.float() / 255."
        )
    if y.is_floating_point() or y.is_complex():
        raise GloroInputError(f"tg.train's {what}: y must hold class indices, got {y.dtype}.")
    return x, y.long()


def _splits(net: GloroNet, info: DatasetInfo, train: Split, val, test, seed: int) -> Splits:
    """The run's splits, each checked against the net's input shape and classes."""
    tests = None if test is None else Split(*_tensors(test, "test"), info)
    if isinstance(val, int) and not isinstance(val, bool):
        if val < 0:
            raise GloroInputError(f"val = {val}: hold out a number of examples >= 0.")
        splits = hold_out(train, val, seed, tests)
    else:
        vals = None if val is None else Split(*_tensors(val, "val"), info)
        splits = Splits(train, vals, tests, torch.empty(0, dtype=torch.long))
    for split in (splits.train, splits.val, splits.test):
        if split is not None:
            check_labels(split.y.cpu(), net.num_classes)
            split.require_model(net.num_classes, net.in_shape or split.x.shape[1:])
    return splits
