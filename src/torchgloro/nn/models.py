"""Architecture registry: ``create_model(name, ...)`` builds the paper's backbones.

Architectures are written in the paper's notation (Appendix B): ``c(C, K, S)`` is a
convolution with C output channels, a K×K kernel and stride S with TF-style SAME padding,
``d(D)`` a dense layer. An activation follows every layer but the last; there is no softmax.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from torchgloro._errors import GloroInputError
from torchgloro.nn.activations import MinMax
from torchgloro.nn.layers import LLNLinear

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "check_model_options",
    "ACTIVATIONS",
    "same_padding",
]

ModelFactory = Callable[..., nn.Sequential]
_MODELS: dict[str, ModelFactory] = {}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "minmax": MinMax}
_INITS: dict[str, Callable[[nn.Parameter], Any]] = {
    "glorot": nn.init.xavier_uniform_,
    "orthogonal": nn.init.orthogonal_,
}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Registers ``factory(in_shape, num_classes, activation, **kwargs) -> nn.Sequential``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        _MODELS[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    """Names of every registered architecture."""
    return sorted(_MODELS)


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Raises unless the registered model ``name`` takes every key of ``options``."""
    if name not in _MODELS:
        raise GloroInputError(f"Unknown model {name!r}; available: {', '.join(list_models())}.")
    params = inspect.signature(_MODELS[name]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # the factory takes any keyword
    known = [k for k, p in list(params.items())[3:] if p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise GloroInputError(
            f"Model {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(known) or 'none'}."
        )
    for key, value in options.items():  # typed like the default: "false" is not False
        default = params[key].default
        if default is params[key].empty or default is None or value is None:
            continue
        want = (int, float) if type(default) is float else (type(default),)
        if type(value) not in want:
            raise GloroInputError(
                f"Model {name!r} option {key!r} must be a {type(default).__name__} like its "
                f"default {default!r}, got {value!r} ({type(value).__name__})."
            )


def create_model(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    activation: str = "relu",
    init: str = "glorot",
    **kwargs: Any,
) -> nn.Sequential:
    """Builds a registered backbone.

    Args:
        name: One of :func:`list_models`.
        in_shape: Per-sample input shape ``(C, H, W)``.
        num_classes: Number of classes (the width of the last layer).
        activation: ``"relu"`` or ``"minmax"``.
        init: ``"glorot"`` (Glorot uniform, zero bias, as Keras) or ``"orthogonal"``.
        **kwargs: Architecture-specific options (e.g. depth and width).

    Returns:
        An ``nn.Sequential`` with attributes ``in_shape``, ``num_classes`` and
        ``gloro_spec`` (what :func:`torchgloro.load` needs to rebuild it).
    """
    if name not in _MODELS:
        raise GloroInputError(f"Unknown model {name!r}; available: {', '.join(list_models())}.")
    if activation not in ACTIVATIONS:
        raise GloroInputError(
            f"Unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}."
        )
    if init not in _INITS:
        raise GloroInputError(f"Unknown init {init!r}; choose from {', '.join(_INITS)}.")
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise GloroInputError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape}.")
    if int(num_classes) < 2:
        raise GloroInputError(f"num_classes must be >= 2, got {num_classes}.")
    c, h, w = (int(s) for s in in_shape)
    if w in (1, 3) and c not in (1, 3) and h > 4:  # (H, W, C), as Keras and numpy lay it out
        raise GloroInputError(
            f"in_shape is (C, H, W), channels first, got {tuple(in_shape)}; did you mean "
            f"({w}, {c}, {h})? (Permute channels-last images with x.permute(0, 3, 1, 2).)"
        )
    check_model_options(name, kwargs)
    in_shape = tuple(int(s) for s in in_shape)
    model = _MODELS[name](in_shape, int(num_classes), activation, **kwargs)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _INITS[init](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    model.in_shape = in_shape
    model.num_classes = int(num_classes)
    model.gloro_spec = {
        "name": name,
        "in_shape": list(in_shape),
        "num_classes": int(num_classes),
        "activation": activation,
        "init": init,
        **kwargs,
    }
    return model


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def build_plan(
    plan: list[tuple],
    in_shape: tuple[int, ...],
    num_classes: int,
    activation: str,
    lln: bool = False,
) -> nn.Sequential:
    """Builds ``c``/``d`` layers from a plan such as ``[("c", 16, 4, 2), ("d", 100)]``.

    The final ``d`` layer gets ``num_classes`` outputs; with ``lln`` it is an
    :class:`~torchgloro.nn.layers.LLNLinear` (last-layer normalization, learnable common scale).
    """
    channels, h, w = in_shape
    layers: list[nn.Module] = []
    flat = False
    for i, step in enumerate(plan):
        last = i == len(plan) - 1
        if step[0] == "c":
            _, out_ch, k, s = step
            (pt, pb), (pl, pr) = same_padding(h, k, s), same_padding(w, k, s)
            if pt == pb and pl == pr:
                layers.append(nn.Conv2d(channels, out_ch, k, s, padding=(pt, pl)))
            else:
                layers += [nn.ZeroPad2d((pl, pr, pt, pb)), nn.Conv2d(channels, out_ch, k, s)]
            channels, h, w = out_ch, math.ceil(h / s), math.ceil(w / s)
        else:
            if not flat:
                layers.append(nn.Flatten())
                channels, flat = channels * h * w, True
            out = num_classes if last else step[1]
            if last and lln:
                layers.append(LLNLinear(channels, out, learn_scale=True))
            else:
                layers.append(nn.Linear(channels, out))
            channels = out
        if not last:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _c(ch: int, k: int, s: int) -> tuple:
    return ("c", ch, k, s)


def _d(n: int) -> tuple:
    return ("d", n)


_PLANS: dict[str, list[tuple]] = {
    # A small convnet for the embedded 8×8 digits data (not from the paper).
    "minicnn": [_c(16, 3, 1), _c(32, 4, 2), _d(100), _d(10)],
    "2c2f": [_c(16, 4, 2), _c(32, 4, 2), _d(100), _d(10)],
    "4c3f": [_c(32, 3, 1), _c(32, 4, 2), _c(64, 3, 1), _c(64, 4, 2), _d(512), _d(512), _d(10)],
    "6c2f": [
        _c(32, 3, 1),
        _c(32, 3, 1),
        _c(32, 4, 2),
        _c(64, 3, 1),
        _c(64, 3, 1),
        _c(64, 4, 2),
        _d(512),
        _d(10),
    ],
    "7c1f": [
        _c(64, 3, 1),
        _c(64, 3, 1),
        _c(64, 4, 2),
        _c(128, 3, 1),
        _c(128, 4, 2),
        _c(256, 3, 1),
        _c(256, 4, 2),
        _d(200),
    ],
}


def _plan_factory(plan: list[tuple]) -> ModelFactory:
    def factory(in_shape, num_classes, activation, lln: bool = False):
        return build_plan(plan, in_shape, num_classes, activation, lln=bool(lln))

    return factory


for _name, _plan in _PLANS.items():
    register_model(_name)(_plan_factory(_plan))

# The registry's other built-in: imported here (not only by the package) so that it is
# registered however torchgloro is imported (the package resolves its names lazily).
from torchgloro.nn import liresnet as _liresnet  # noqa: E402, F401
