"""Lazy package attributes (PEP 562), so that ``gloro --help`` does not import torch.

A package lists where each public name lives; the module is imported on first access and
the value cached in the package, so later accesses cost nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes", "callable_module"]


def lazy_attributes(
    package: str, where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: The package's ``__name__``.
        where: Public name -> the module that defines it; a submodule maps to itself
            (``"data": "torchgloro.data"``).
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook's own name
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        obj = importlib.import_module(module)
        value = obj if module == f"{package}.{name}" else getattr(obj, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__


def callable_module(package: str, module: str, name: str) -> None:
    """Makes the (sub)package ``package`` callable: calling it calls ``module.name``,
    imported on the first call. ``tg.train(...)`` so runs :func:`torchgloro.train.api.train`
    while ``tg.train.load_config`` stays the subpackage's.
    """

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(module), name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = f"Calls :func:`{module}.{name}`."
    sys.modules[package].__class__ = CallableModule
