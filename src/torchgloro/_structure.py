"""What a GloroNet's bounds were built for: the backbone's modules and their settings.

A GloroNet builds its layer bounds once, for the backbone's modules as they are then: each
bound holds its layer and the settings it read (stride, padding, residual scale, ...). The
caches of proven bounds are keyed on the values of the backbone's tensors, which covers
training and ``load_state_dict``. This module covers the rest, each of which would leave the
bounds describing another network than the one certified:

* a module replaced, inserted or removed (``net.backbone[0] = nn.Linear(...)``);
* a setting changed in place or reassigned (``block.residual_scale = 2.0``,
  ``pool.kernel_size[0] = 3``, ``conv.padding_mode = ...``), an attribute added or removed
  (an instance ``forward`` override), or a module's class swapped
  (``torch.nn.utils.parametrize``): every public attribute is compared, fail-closed;
* forward hooks, which change a layer's output behind its bound's back (the old
  ``torch.nn.utils.spectral_norm`` installs one), on a module or globally: refused by the
  proofs (:func:`refuse_hooks`), allowed elsewhere (inspection tools use them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from torchgloro._errors import GloroInputError, UnsupportedLayerError


@dataclass(frozen=True)
class Structure:
    """The backbone's modules (by identity), and each one's class and public attributes
    (names, and a snapshot of each value), when the bounds were built."""

    modules: tuple[nn.Module, ...]
    settings: tuple[tuple[type, tuple[tuple[str, Any], ...]], ...]


def structure_of(backbone: nn.Module) -> Structure:
    """Records ``backbone``'s structure.

    Raises:
        UnsupportedLayerError: a module has its own ``forward`` attribute (an instance
            override runs instead of the code the layer's bound was proven for).
    """
    modules = tuple(_walk(backbone, []))
    for m in modules:
        if "forward" in vars(m):
            raise UnsupportedLayerError(
                f"{m.__class__.__name__} in the backbone has its own forward attribute, which "
                f"runs instead of the {m.__class__.__name__} its bound is proven for. Remove it."
            )
    return Structure(modules, tuple((type(m), _snapshot(m)) for m in modules))


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
    for m, (cls, settings) in zip(modules, built.settings):
        if type(m) is not cls or not _same(m, settings):
            now = dict(_public(m))
            changed = sorted(
                {k for k, _ in settings if k not in now or not _equal(now[k], dict(settings)[k])}
                | (now.keys() - dict(settings).keys())
            )
            raise GloroInputError(
                f"A {cls.__name__} layer of the backbone changed after this GloroNet was "
                f"built ({', '.join(changed) or 'its class'}), so its Lipschitz bound "
                f"describes the old layer. Build a new GloroNet around the modified backbone."
            )
    return modules


def state_tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``modules`` (what the bounds'
    values depend on)."""
    out = []
    for m in modules:
        out += [t for t in m._parameters.values() if t is not None]
        out += [t for t in m._buffers.values() if t is not None]
        out += [v for k, v in vars(m).items() if isinstance(v, torch.Tensor) and k[0] != "_"]
    return out


def refuse_hooks(modules: Sequence[nn.Module]) -> None:
    """Raises :class:`UnsupportedLayerError` if a forward hook could change an output."""
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
            "Lipschitz bound seeing it. Remove them before certifying."
        )


_SCALARS = (bool, int, float, str, type(None))


def _walk(m: nn.Module, out: list[nn.Module]) -> list[nn.Module]:
    """``m`` and its submodules, depth first (``Module.modules()`` order, without its memo).

    A ``torch.compile`` wrapper stands for the module it wraps (the same layers run).
    """
    m = getattr(m, "_orig_mod", m)
    out.append(m)
    for child in m._modules.values():
        if child is not None:
            _walk(child, out)
    return out


def _public(m: nn.Module):
    """(name, value) of every public attribute but ``training``; tensors are compared by
    value through :func:`state_tensors`, not here."""
    for k, v in vars(m).items():
        if k[0] != "_" and k != "training" and not isinstance(v, torch.Tensor):
            yield k, v


def _snapshot(m: nn.Module) -> tuple[tuple[str, Any], ...]:
    """Plain values (numbers, strings, tuples of them) as they are; containers deep-copied
    (a list can change in place); anything else by identity."""
    out = []
    for k, v in _public(m):
        if isinstance(v, (list, dict, set)):
            v = copy.deepcopy(v)
        out.append((k, v))
    return tuple(out)


def _same(m: nn.Module, settings: tuple[tuple[str, Any], ...]) -> bool:
    d = vars(m)
    n_public = sum(1 for _ in _public(m))
    if n_public != len(settings):
        return False
    return all(k in d and _equal(d[k], v) for k, v in settings)


def _equal(now: Any, then: Any) -> bool:
    if isinstance(then, _SCALARS) or (
        isinstance(then, tuple) and all(isinstance(e, _SCALARS) for e in then)
    ):
        return type(now) is type(then) and now == then
    if isinstance(then, (list, dict, set)):
        try:
            return type(now) is type(then) and bool(now == then)
        except Exception:  # noqa: BLE001 - an element whose == is not a bool: a change
            return False
    return now is then
