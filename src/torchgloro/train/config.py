"""Training configuration: typed dataclasses are the source of truth.

A :class:`TrainConfig` has one dataclass per TOML table (``[run]``, ``[data]``, ``[model]``,
``[gloro]``, ``[loss]``, ``[optim]``). Values come from, in order: the dataclass defaults
(= the ``digits-minicnn-gloro`` recipe), a recipe or TOML file, then ``--set key=value``
overrides. Every value is parsed and checked against its field's type; unknown keys raise
:class:`~torchgloro.ConfigError` with a "did you mean" suggestion.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torchgloro._errors import ConfigError
from torchgloro.train._coerce import coerce

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "GloroConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "saved_run_config",
    "config_to_dict",
    "dump_config",
    "list_recipes",
    "recipe_path",
    "DEFAULT_RECIPE",
    "RESUME_OVERRIDABLE",
]

DEFAULT_RECIPE = "digits-minicnn-gloro"


@dataclass
class RunConfig:
    name: str = "digits-minicnn-gloro"
    out: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 40
    batch_size: int = 256  # global batch size (all DDP ranks together)
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # epochs
    compile: bool = False  # the whole training step under torch.compile (docs/performance.md)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no C++ compiler)
    amp: str = "off"  # off | bf16 (autocast of the backbone on CUDA; the bound stays fp32)
    threads: int = 0  # CPU threads for torch (0 = torch's default); small models like 1
    test_every_epoch: bool = False  # also certify the test split after every epoch
    channels_last: bool = False  # 4-d weights channels-last (NHWC): faster convs on CPUs
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard (the extra)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None  # omitted from TOML when None
    download: bool = False
    augment: bool = False
    train_subset: int = 0  # 0 = the whole training split (after val_size is held out)
    # Training images held out (seeded by run.seed) as the validation split, on which the
    # per-epoch VRA and best.safetensors are chosen; 0 = none (the test split is used).
    val_size: int = 300


@dataclass
class ModelConfig:
    arch: str = "minicnn"
    activation: str = "relu"
    init: str = "glorot"
    # Architecture options passed to create_model, e.g. {lln = true} or, for liresnet,
    # {depth = 12, width = 128}; from the CLI: --set 'model.options={"lln": true}'.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class GloroConfig:
    epsilon_train: float = 0.0  # 0 = epsilon_test
    epsilon_test: float = 0.0  # 0 = the dataset's default_epsilon
    epsilon_schedule: str = "single"  # single | log | x,y,e
    power_iterations: int = 10
    lipschitz: str = "margin"  # margin | basic
    robust: bool = True  # false: a non-robust "standard" baseline trained with CE on f
    cuda_graphs: bool = True  # replay each step's power iterations from a CUDA graph


@dataclass
class LossConfig:
    name: str = "ce"  # see torchgloro.train.loop.LOSSES
    lam_schedule: str = "1.0"  # TRADES λ: x | x,y,e
    trades_robust: str = "ce"  # TRADES robust term: ce (Definition 3) | kl (CE minus H(p))


@dataclass
class OptimConfig:
    name: str = "adam"  # see torchgloro.train.loop.OPTIMIZERS
    lr: float = 1e-3
    lr_schedule: str = "decay_to_1e-6"  # constant | decay_to_X | cosine
    decay_start: float = 0.5  # decay_to_X starts at this fraction of the epochs (paper: 0.5)
    warmup_lr_epochs: float = 0.0  # linear LR warm-up from 0 (any schedule)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7  # Keras' default, as in the paper
    weight_decay: float = 0.0  # never applied to biases / 1-d parameters
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    warmup_epochs: int = 0  # epochs of standard CE on f before the GloRo loss
    fused: str = "auto"  # auto (on CUDA, unless run.compile fuses the update) | on | off


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gloro: GloroConfig = field(default_factory=GloroConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> TrainConfig:
        """Checks choices and ranges; returns ``self``. Raises :class:`ConfigError`."""
        from torchgloro import schedules
        from torchgloro._errors import GloroInputError
        from torchgloro.losses import GloroTrades
        from torchgloro.nn.models import ACTIVATIONS, check_model_options, list_models
        from torchgloro.train.build import LOSSES, OPTIMIZERS, parse_lr

        def choice(key: str, value: str, options) -> None:
            if value not in options:
                raise ConfigError(
                    f"{key} = {value!r} is not one of {', '.join(map(str, options))}"
                    f"{_suggest(value, list(options))}."
                )

        def at_least(key: str, value: float, low: float, strict: bool = False) -> None:
            # math.isfinite as well: NaN compares False with everything, and inf passes `<`.
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ConfigError(
                    f"{key} must be a finite number {'>' if strict else '>='} {low}, got {value}."
                )

        r, d, m, g, lo, o = self.run, self.data, self.model, self.gloro, self.loss, self.optim
        choice("run.device", r.device, ("auto", "cpu", "cuda"))
        choice("run.amp", r.amp, ("off", "bf16"))
        choice("run.compile_mode", r.compile_mode, ("default", "reduce-overhead", "max-autotune"))
        if r.compile:
            from torch._dynamo import list_backends

            choice("run.compile_backend", r.compile_backend, list_backends(exclude_tags=()))
        at_least("run.epochs", r.epochs, 1)
        at_least("run.batch_size", r.batch_size, 1)
        at_least("run.eval_batch_size", r.eval_batch_size, 1)
        at_least("run.threads", r.threads, 0)
        at_least("run.checkpoint_every", r.checkpoint_every, 1)
        at_least("data.train_subset", d.train_subset, 0)
        at_least("data.val_size", d.val_size, 0)
        if not r.name or r.name[0] in "-." or any(c in r.name for c in "/\\"):
            raise ConfigError(
                f"run.name = {r.name!r} must name a folder inside run.out: not empty, without "
                f"'/' or '\\', not starting with '-' or '.'."
            )
        if not d.name:
            raise ConfigError("data.name must not be empty.")
        choice("model.arch", m.arch, list_models())
        try:
            check_model_options(m.arch, m.options)
        except GloroInputError as e:
            raise ConfigError(f"model.options: {e}") from None
        choice("model.activation", m.activation, list(ACTIVATIONS))
        choice("model.init", m.init, ("glorot", "orthogonal"))
        at_least("gloro.epsilon_train", g.epsilon_train, 0)
        at_least("gloro.epsilon_test", g.epsilon_test, 0)
        at_least("gloro.power_iterations", g.power_iterations, 0)
        choice("gloro.lipschitz", g.lipschitz, ("margin", "basic"))
        schedules.parse_epsilon_schedule(g.epsilon_schedule)
        choice("loss.name", lo.name, list(LOSSES))
        if not g.robust and lo.name != LossConfig.name:
            raise ConfigError(
                f"loss.name = {lo.name!r} with gloro.robust = false: a standard run trains f "
                f"with cross-entropy and would ignore the loss. Set loss.name = "
                f"{LossConfig.name!r}, or gloro.robust = true."
            )
        schedules.parse_lambda_schedule(lo.lam_schedule)
        choice("loss.trades_robust", lo.trades_robust, list(GloroTrades.FORMS))
        choice("optim.name", o.name, list(OPTIMIZERS))
        at_least("optim.lr", o.lr, 0, strict=True)
        if not 0 <= o.decay_start < 1:
            raise ConfigError(f"optim.decay_start must lie in [0, 1), got {o.decay_start}.")
        parse_lr(o.lr_schedule, o.warmup_lr_epochs, o.decay_start)
        at_least("optim.warmup_lr_epochs", o.warmup_lr_epochs, 0)
        if not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {o.betas}.")
        at_least("optim.eps", o.eps, 0, strict=True)  # Adam divides by sqrt(v) + eps
        at_least("optim.weight_decay", o.weight_decay, 0)
        at_least("optim.grad_clip", o.grad_clip, 0)
        at_least("optim.warmup_epochs", o.warmup_epochs, 0)
        choice("optim.fused", o.fused, ("auto", "on", "off"))
        return self


_SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)


# Names people reach for, from other tools, and the key that does it here.
_KEY_ALIASES = {
    "data.limit": "data.train_subset",
    "data.subset": "data.train_subset",
    "data.n_train": "data.train_subset",
    "data.validation_size": "data.val_size",
    "data.val_split": "data.val_size",
    "data.dataset": "data.name",
    "data.data_dir": "data.root",
    "run.lr": "optim.lr",
    "run.batch": "run.batch_size",
    "run.output": "run.out",
    "gloro.epsilon": "gloro.epsilon_test",
    "gloro.eps": "gloro.epsilon_test",
    "optim.optimizer": "optim.name",
    "loss.lam": "loss.lam_schedule",
}


def _suggest(word: str, options: list[str]) -> str:
    alias = _KEY_ALIASES.get(word)
    close = [alias] if alias else difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set(cfg: TrainConfig, dotted: str, value: Any, from_text: bool) -> None:
    section, _, name = dotted.partition(".")
    if section not in _SECTIONS or not name:
        raise ConfigError(f"Unknown config key {dotted!r}{_suggest(dotted, _all_keys())}.")
    types = _field_types(_SECTIONS[section])
    if name not in types:
        raise ConfigError(f"Unknown config key {dotted!r}{_suggest(dotted, _all_keys())}.")
    setattr(getattr(cfg, section), name, coerce(dotted, value, types[name], from_text))


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Applies a nested dict (as read from TOML) on top of ``base`` (default: defaults)."""
    cfg = _deepcopy(base) if base is not None else TrainConfig()
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"Unknown config section [{section}]{_suggest(section, list(_SECTIONS))}; "
                f"sections are {', '.join(f'[{s}]' for s in _SECTIONS)}."
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table, got {table!r}.")
        for key, value in table.items():
            _set(cfg, f"{section}.{key}", value, from_text=False)
    return cfg


# Keys added after runs were saved, with the value such runs were trained with: in a saved
# run's config a missing key means this, not today's default.
_PREDATES = {"loss": {"trades_robust": "kl"}, "data": {"val_size": 0}}


# Config keys that may change when resuming (they do not alter the trajectory of training).
RESUME_OVERRIDABLE = {
    "run.device",
    "run.out",
    "run.eval_batch_size",
    "run.threads",
    "run.channels_last",  # a memory layout: the same math, rounded by other kernels
    "run.checkpoint_every",
    "run.test_every_epoch",  # which splits are certified after an epoch, not the training
    "run.tensorboard",
    "run.compile",  # how the same math runs, not what it computes
    "run.compile_mode",
    "run.compile_backend",
    "gloro.cuda_graphs",
    "data.root",
    "data.download",
}


def saved_run_config(saved: dict[str, Any]) -> TrainConfig:
    """The config a saved run (its checkpoint's ``config``) was trained with.

    Raises:
        ConfigError: ``saved`` is not a table of tables, or holds unknown or mistyped keys.
    """
    if not isinstance(saved, dict) or not all(isinstance(t, dict) for t in saved.values()):
        raise ConfigError(f"a saved config must be a table of tables, got {saved!r:.80}.")
    data = {section: dict(table) for section, table in saved.items()}
    for section, keys in _PREDATES.items():
        for key, value in keys.items():
            data.setdefault(section, {}).setdefault(key, value)
    return config_from_dict(data)


def _deepcopy(cfg: TrainConfig) -> TrainConfig:
    return TrainConfig(**{s: copy.deepcopy(getattr(cfg, s)) for s in _SECTIONS})


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as nested TOML-able dicts (``None`` values omitted, tuples as lists)."""
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        table = {}
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            if v is None:
                continue
            table[f.name] = list(v) if isinstance(v, tuple) else v
        out[section] = table
    return out


def dump_config(cfg: TrainConfig) -> str:
    """The config as TOML text (written with ``tomli-w``)."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(cfg))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Applies ``key=value`` strings (dotted keys, e.g. ``gloro.epsilon_train=0.5``)."""
    cfg = _deepcopy(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}.")
        _set(cfg, key.strip(), value.strip(), from_text=True)
    return cfg


def _configs_dir():
    return resources.files("torchgloro") / "configs"


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``torchgloro/configs``."""
    return sorted(p.name[:-5] for p in _configs_dir().iterdir() if p.name.endswith(".toml"))


def recipe_path(recipe: str) -> Path:
    """A packaged recipe name (e.g. ``mnist-2c2f-gloro``) or a path to a TOML file."""
    p = Path(recipe)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}.")
        return p
    packaged = _configs_dir() / f"{recipe}.toml"
    if not packaged.is_file():
        raise ConfigError(
            f"Unknown recipe {recipe!r}{_suggest(recipe, list_recipes())}; recipes: "
            f"{', '.join(list_recipes())}, or pass a path to a .toml file."
        )
    return Path(str(packaged))


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML (UTF-8 text): {e}.") from e
    except OSError as e:
        raise ConfigError(f"Cannot read config {path}: {e}.") from e


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None):
    """Builds a validated :class:`TrainConfig` from a recipe/TOML file and overrides.

    Args:
        recipe: A packaged recipe name, a path to a TOML file, or ``None`` (the default,
            ``digits-minicnn-gloro``).
        overrides: ``key=value`` strings applied last.
    """
    path = recipe_path(str(recipe) if recipe is not None else DEFAULT_RECIPE)
    cfg = config_from_dict(read_toml(path))
    return apply_overrides(cfg, list(overrides or [])).validate()
