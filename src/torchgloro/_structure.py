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

from torch import nn
from torch.nn.modules import module as _module

from torchgloro._errors import GloroInputError, UnsupportedLayerError

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Structure:
    """The backbone's modules (by identity) and their plain settings, when bounds were built."""

    modules: tuple[nn.Module, ...]
    settings: tuple


def structure_of(backbone: nn.Module) -> Structure:
    """Records ``backbone``'s structure; raises :class:`UnsupportedLayerError` on hooks."""
    modules = tuple(backbone.modules())
    _refuse_hooks(modules)
    return Structure(modules, _settings(modules))


def check_structure(backbone: nn.Module, built: Structure) -> None:
    """Raises unless ``backbone`` still has the structure its bounds were built for."""
    modules = tuple(backbone.modules())
    if len(modules) != len(built.modules) or any(
        a is not b for a, b in zip(modules, built.modules)
    ):
        raise GloroInputError(
            "The backbone's modules changed after this GloroNet was built (a layer replaced, "
            "added or removed), so its Lipschitz bounds describe the old network. Build a "
            "new GloroNet around the modified backbone."
        )
    settings = _settings(modules)
    if settings != built.settings:
        old, new = next((a, b) for a, b in zip(built.settings, settings) if a != b)
        changed = sorted({k for k, _ in set(old[1]) ^ set(new[1])}) or ["its class"]
        raise GloroInputError(
            f"A {old[0].__name__} layer of the backbone changed after this GloroNet was built "
            f"({', '.join(changed)}), so its Lipschitz bound describes the old layer. Build "
            f"a new GloroNet around the modified backbone."
        )
    _refuse_hooks(modules)


def _settings(modules: Sequence[nn.Module]) -> tuple:
    """Each module's class and public plain attributes (numbers, strings, tuples of them)."""
    return tuple((type(m), tuple(_plain(m))) for m in modules)


def _plain(m: nn.Module):
    for k, v in vars(m).items():
        if k[0] == "_" or k == "training":
            continue
        if isinstance(v, _SCALARS) or (
            isinstance(v, tuple) and all(isinstance(e, _SCALARS) for e in v)
        ):
            yield k, v


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
