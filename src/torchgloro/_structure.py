"""What a GloroNet's bounds were built for: the backbone's modules, their settings, no hooks.

A GloroNet builds its layer bounds once, for the backbone's modules as they are then: each
bound holds its layer and the settings it read (stride, padding, residual scale, ...). The
caches of proven bounds are keyed on the values of the backbone's parameters and buffers,
which covers training and ``load_state_dict``. This module covers the rest, each of which
would leave the bounds describing another network than the one certified:

* a module replaced, inserted or removed (``net.backbone[0] = nn.Linear(...)``);
* a setting changed in place (``block.residual_scale = 2.0``, ``conv.padding_mode = ...``),
  or a module's class swapped (``torch.nn.utils.parametrize``);
* forward hooks, which change a layer's output behind its bound's back (the old
  ``torch.nn.utils.spectral_norm`` installs one), on a module or globally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module

from torchgloro._errors import GloroInputError, UnsupportedLayerError

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Structure:
    """The backbone's modules (by identity), and each one's class and plain settings (the
    names of its public plain attributes and their values), when the bounds were built."""

    modules: tuple[nn.Module, ...]
    settings: tuple[tuple[type, tuple[str, ...], tuple], ...]


def structure_of(backbone: nn.Module) -> Structure:
    """Records ``backbone``'s structure; raises :class:`UnsupportedLayerError` on hooks."""
    modules = tuple(_walk(backbone, []))
    _refuse_hooks(modules)
    settings = []
    for m in modules:
        keys = tuple(k for k, v in vars(m).items() if _is_setting(k, v))
        settings.append((type(m), keys, tuple(vars(m)[k] for k in keys)))
    return Structure(modules, tuple(settings))


def check_structure(backbone: nn.Module, built: Structure) -> list[nn.Module]:
    """Raises unless ``backbone`` still has the structure its bounds were built for.

    Returns:
        The backbone's modules (for :func:`state_tensors`).
    """
    modules = _walk(backbone, [])
    if len(modules) != len(built.modules) or any(
        a is not b for a, b in zip(modules, built.modules)
    ):
        raise GloroInputError(
            "The backbone's modules changed after this GloroNet was built (a layer replaced, "
            "added or removed), so its Lipschitz bounds describe the old network. Build a "
            "new GloroNet around the modified backbone."
        )
    for m, (cls, keys, values) in zip(modules, built.settings):
        d = vars(m)
        if type(m) is not cls or tuple(d.get(k, _MISSING) for k in keys) != values:
            changed = [k for k, v in zip(keys, values) if d.get(k, _MISSING) != v]
            raise GloroInputError(
                f"A {cls.__name__} layer of the backbone changed after this GloroNet was "
                f"built ({', '.join(changed) or 'its class'}), so its Lipschitz bound "
                f"describes the old layer. Build a new GloroNet around the modified backbone."
            )
    _refuse_hooks(modules)
    return modules


def state_tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (what the bounds' values depend on)."""
    return [
        t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
    ]


_MISSING = object()


def _walk(m: nn.Module, out: list[nn.Module]) -> list[nn.Module]:
    """``m`` and its submodules, depth first (``Module.modules()`` order, without its memo)."""
    out.append(m)
    for child in m._modules.values():
        if child is not None:
            _walk(child, out)
    return out


def _is_setting(key: str, value) -> bool:
    """A public plain attribute: a number, string, None, or a tuple of those."""
    if key[0] == "_" or key == "training":
        return False
    return isinstance(value, _SCALARS) or (
        isinstance(value, tuple) and all(isinstance(e, _SCALARS) for e in value)
    )


def _refuse_hooks(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            raise UnsupportedLayerError(
                f"{m.__class__.__name__} in the backbone has forward hooks, which can change "
                f"its output without its Lipschitz bound seeing it (torch.nn.utils."
                f"spectral_norm installs one), so nothing through it could be certified. "
                f"Remove the hooks (for spectral_norm: torch.nn.utils.remove_spectral_norm)."
            )
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        raise UnsupportedLayerError(
            "Global forward hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook): they can change any layer's output without its "
            "Lipschitz bound seeing it. Remove them before building or certifying a GloroNet."
        )
