"""Config text: a YAML or ``--set`` value checked against a config field's annotation
(:func:`coerce`), and the trailing comments of the dataclass fields (:func:`field_comments`, the
units and choices a run folder's ``config.yaml`` shows). ``config.py`` holds the sections and rules.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

import yaml

from .errors import ConfigError


def field_comments(cls) -> dict:
    """Trailing ``# comment`` of each field in the dataclass source (units, choices)."""
    import inspect

    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", "def", '"')):
            name = line.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = line.split("#", 1)[1].strip()
    return out


def coerce(value: Any, tp: Any, key: str, origin: str, from_string: bool) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from ``--set`` are parsed first."""
    if from_string and isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            pass
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, origin, from_string)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{origin}: {key}: bad value {value!r}")
    if origin_tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: {key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]", origin, from_string) for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin_tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{origin}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "5e-4" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{origin}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) and key.endswith("enabled"):
            return str(value).lower()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{origin}: {key}: expected a string, got {value!r}")
        return str(value)
    return value


__all__ = ["coerce", "field_comments"]
