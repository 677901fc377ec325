"""Config text: YAML read strictly (:func:`load_yaml`: a key given twice in one mapping is an
error, not "the last one wins"), a YAML or ``--set`` value checked against a config field's annotation
(:func:`coerce`), and the trailing comments of the dataclass fields (:func:`field_comments`, the
units and choices a run folder's ``config.yaml`` shows), and a config file read with its preset
(:func:`read_config`: a top-level ``base: presets/md17_l2`` names a file under ``configs/`` whose
sections the file extends). ``config.py`` holds the sections and rules.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

#: the shipped configs; ``base:`` names are resolved here
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: the top-level key of a config file that names its preset
BASE_KEY = "base"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of the YAML text names one key twice (plain ``yaml.safe_load`` keeps the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, a whole section included
    (``train:`` twice once turned a 1-epoch file into a 1500-epoch run)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` then a key of base: an override, as YAML means it
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        None, None, f"key {key!r} appears twice (first at line {first.line + 1}); YAML would "
                        "keep only the last: remove or merge one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, origin: str) -> Any:
    """Parse YAML ``text`` with :class:`UniqueKeyLoader`; a duplicate key or a syntax error is one
    :class:`ConfigError` line ``<origin>: line N: <problem>``. Every YAML the package reads (configs,
    a run folder's ``config.yaml``) goes through here."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        if isinstance(exc, DuplicateKeyError):
            raise ConfigError(f"{origin}:{where}: {problem}") from None
        raise ConfigError(f"{origin}:{where} not valid YAML ({problem})") from None


def read_config(path: Path, config_dir: Path = CONFIG_DIR) -> tuple[Any, str]:
    """``(mapping, text)`` of the config file ``path``: its YAML (:func:`load_yaml`) on top of its
    preset, and the file's own text. A top-level ``base: NAME`` names a file ``config_dir/NAME[.yaml]``
    (itself read this way, so presets chain); the file's keys override the preset's key by key
    within each section (a list or mapping value is replaced whole, as with ``--set``). The values a
    preset gives count as the file's: the file says where they come from. Unreadable files, a base
    outside ``config_dir`` or missing, and a chain of bases that loops are one :class:`ConfigError`
    line."""
    return _read_config(Path(path), Path(config_dir), ())


def _read_config(path: Path, config_dir: Path, chain: tuple) -> tuple[Any, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (binary data); --config takes a YAML file or a name in "
                          "configs/") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict) or BASE_KEY not in raw:
        return raw, text
    raw = dict(raw)
    base = _base_path(raw.pop(BASE_KEY), path, config_dir)
    if base in chain or base == path.resolve():
        loop = " -> ".join(str(p) for p in (*chain, path.resolve(), base))
        raise ConfigError(f"{path}: {BASE_KEY}: the chain of presets loops ({loop})")
    under, _ = _read_config(base, config_dir, (*chain, path.resolve()))
    if not isinstance(under, dict):
        raise ConfigError(f"{base}: expected a mapping of sections, got {type(under).__name__}")
    merged = dict(under)
    for section, values in raw.items():
        below = merged.get(section)
        if isinstance(below, dict) and (values is None or isinstance(values, dict)):
            values = {**below, **(values or {})}  # an empty section keeps the preset's keys
        merged[section] = values
    return merged, text


def _base_path(name: Any, path: Path, config_dir: Path) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: {BASE_KEY}: expected the name of a preset under configs/ "
                          f"(e.g. presets/md17_l2), got {name!r}")
    root = config_dir.resolve()
    base = (root / name).with_suffix(".yaml") if not name.endswith((".yaml", ".yml")) else root / name
    base = base.resolve()
    if root not in base.parents:
        raise ConfigError(f"{path}: {BASE_KEY}: {name!r} is outside configs/; a preset is a file under configs/")
    if not base.is_file():
        raise ConfigError(f"{path}: {BASE_KEY}: no such preset configs/{base.relative_to(root)}")
    return base


def config_section(name: str, section: str) -> dict:
    """One section of the shipped config ``configs/<name>.yaml``, with its preset (:func:`read_config`)."""
    raw, _ = read_config(CONFIG_DIR / f"{name}.yaml")
    return dict(raw[section])


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
            value = yaml.load(value, Loader=UniqueKeyLoader) if value != "" else ""  # noqa: S506
        except DuplicateKeyError as exc:
            raise ConfigError(f"{origin}: {key}: {exc.problem}") from None
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
        if not args:
            return list(value)
        return [coerce(v, args[0], f"{key}[{i}]", origin, from_string) for i, v in enumerate(value)]
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


__all__ = ["BASE_KEY", "CONFIG_DIR", "UniqueKeyLoader", "coerce", "config_section", "field_comments", "load_yaml",
           "read_config"]
