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
* a parameter or buffer whose shape changed (a 3x3 kernel swapped for a 5x5 one under
  ``padding="same"``: the bound would keep the old padding), added or removed;
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
class _Settings:
    """One module's class and public attributes at build time, sorted by how to compare."""

    cls: type
    all_keys: tuple[str, ...]  # every key of the module's __dict__ (a fast first test)
    names: tuple[str, ...]  # every public attribute name, in order (tensors included)
    plain_keys: tuple[str, ...]  # numbers, strings, None and tuples of them: by ==
    plain: tuple
    container_keys: tuple[str, ...]  # lists, dicts, sets: by == against a deep copy
    containers: tuple
    other_keys: tuple[str, ...]  # anything else but tensors: by identity
    others: tuple
    tensor_keys: tuple[str, ...]  # plain tensor attributes: values join the weights key
    shapes: tuple  # (name, shape or None) of every parameter and buffer

    @classmethod
    def of(cls, m: nn.Module) -> _Settings:
        d = vars(m)
        names = tuple(k for k in d if k[0] != "_")  # "training" too: it is never removed
        kinds: dict[str, list[str]] = {"plain": [], "container": [], "other": [], "tensor": []}
        for k in names:
            if k != "training":
                kinds[_kind(d[k])].append(k)
        p, c, o, t = (tuple(kinds[x]) for x in ("plain", "container", "other", "tensor"))
        return cls(
            _cls(m), tuple(d), names, p, tuple(d[k] for k in p), c,
            tuple(copy.deepcopy(d[k]) for k in c), o, tuple(d[k] for k in o), t, _shapes(m),
        )  # fmt: skip

    def matches(self, m: nn.Module) -> bool:
        d = vars(m)
        if _cls(m) is not self.cls:
            return False
        # The same keys (private ones may come and go: torch.compile in place adds one).
        if tuple(d) != self.all_keys and tuple(k for k in d if k[0] != "_") != self.names:
            return False
        if _shapes(m) != self.shapes:  # weight surgery (a 3x3 kernel made 5x5, ...)
            return False
        try:
            return (
                all(d[k] == v for k, v in zip(self.plain_keys, self.plain))
                and all(d[k] is v for k, v in zip(self.other_keys, self.others))
                and all(bool(d[k] == v) for k, v in zip(self.container_keys, self.containers))
            )
        except Exception:  # noqa: BLE001 - a value whose == is not a bool: a change
            return False

    def changed(self, m: nn.Module) -> list[str]:
        """Names of the attributes that differ (for the error message)."""
        d, then = vars(m), {**dict(zip(self.plain_keys, self.plain)),
                            **dict(zip(self.container_keys, self.containers))}  # fmt: skip
        now = {k for k in d if k[0] != "_"}
        out = set(self.names) ^ now
        out |= {k for k in self.plain_keys + self.container_keys if k in d and d[k] != then[k]}
        out |= {k for k, v in zip(self.other_keys, self.others) if k in d and d[k] is not v}
        then_t, now_t = dict(self.shapes), dict(_shapes(m))
        for k in then_t.keys() | now_t.keys():
            if k not in now_t:
                out.add(f"tensor {k} removed")
            elif k not in then_t:
                out.add(f"tensor {k} added")
            elif then_t[k] != now_t[k]:
                out.add(f"the shape of {k}: {then_t[k]} -> {now_t[k]}")
        return sorted(out)


@dataclass(frozen=True)
class Structure:
    """The backbone's modules (by identity) and their settings when the bounds were built."""

    modules: tuple[nn.Module, ...]
    settings: tuple[_Settings, ...]


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
    return Structure(modules, tuple(_Settings.of(m) for m in modules))


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
    for m, settings in zip(modules, built.settings):
        if not settings.matches(m):
            changed = settings.changed(m) if _cls(m) is settings.cls else []
            raise GloroInputError(
                f"A {settings.cls.__name__} layer of the backbone changed after this GloroNet "
                f"was built ({', '.join(changed) or 'its class'}), so its Lipschitz bound "
                f"describes the old layer. Build a new GloroNet around the modified backbone."
            )
    return modules


def state_tensors(modules: Sequence[nn.Module], built: Structure) -> list[torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``modules`` (what the bounds'
    values depend on), for modules that passed :func:`check_structure`."""
    out = []
    for m, settings in zip(modules, built.settings):
        out += [t for t in m._parameters.values() if t is not None]
        out += [t for t in m._buffers.values() if t is not None]
        d = vars(m)
        out += [d[k] for k in settings.tensor_keys if isinstance(d[k], torch.Tensor)]
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


def _cls(m: nn.Module) -> type:
    """``type(m)``; for a ``torch.fx.GraphModule``, the class below the one-off subclass it
    makes per instance (a copy gets another), whose forward is compiled from ``m.graph``."""
    cls = type(m)
    while cls.__qualname__.endswith("GraphModuleImpl"):
        cls = cls.__bases__[0]
    return cls


def _walk(m: nn.Module, out: list[nn.Module]) -> list[nn.Module]:
    """``m`` and its submodules, depth first (``Module.modules()`` order, without its memo).

    A ``torch.compile`` wrapper stands for the module it wraps (the same layers run).
    """
    m = m._modules.get("_orig_mod", m)  # (not getattr: Module.__getattr__ raising is slow)
    out.append(m)
    for child in m._modules.values():
        if child is not None:
            _walk(child, out)
    return out


def _shapes(m: nn.Module) -> tuple:
    """``(name, shape or None)`` of ``m``'s own parameters, then its buffers."""
    return tuple(
        (k, None if t is None else tuple(t.shape))
        for k, t in (*m._parameters.items(), *m._buffers.items())
    )


def _kind(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, _SCALARS) or (
        isinstance(v, tuple) and all(isinstance(e, _SCALARS) for e in v)
    ):
        return "plain"
    return "container" if isinstance(v, (list, dict, set)) else "other"
