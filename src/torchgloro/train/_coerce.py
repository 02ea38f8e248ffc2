"""Config values parsed to their field's type: TOML-native values, or text from ``--set``."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from torchgloro._errors import ConfigError

__all__ = ["coerce"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Converts ``value`` (TOML-native, or a string from ``--set``) to the type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}.")
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        inner = [a for a in args if a is not type(None)]
        if from_text and str(value).strip().lower() in ("", "none", "null"):
            return None
        return coerce(key, value, inner[0], from_text)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, e.g. 0.9,0.999; got {value!r}.")
        return tuple(coerce(key, v, a, True) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):  # e.g. lam_schedule = 1.2
            return repr(value) if isinstance(value, float) else str(value)
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover
