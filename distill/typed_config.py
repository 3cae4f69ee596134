"""Typed configuration from YAML: nested dataclasses, ``key=value`` overrides, errors that name the key.

The machinery behind every recipe of the project (:mod:`distill.config` for training,
:mod:`distill.text_config` for the text-student job): a YAML mapping and ``a.b.c=value``
overrides become one dataclass tree, each value coerced to its annotated type; an unknown key or
a value of the wrong type raises :class:`ConfigError` naming the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with an error naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: cannot interpret {value!r} ({'; '.join(errors)})")
    if origin is list:
        seq = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(seq, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (or a comma-separated string), got {value!r}")
        if dataclasses.is_dataclass(args[0]):  # e.g. data.train's sources
            return [from_dict(args[0], v, prefix=f"{key}[{i}].") for i, v in enumerate(seq)]
        return [coerce(v, args[0], key) for v in seq]
    if origin is dict:
        table = {} if value is None else _dotted_map(value, key) if isinstance(value, str) else value
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key}: expected a mapping (or KEY.FIELD=VALUE,...), got {value!r}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in table.items()}
    if origin is tuple:
        seq = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(seq, (list, tuple)) or len(seq) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(seq, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            out = hint(value)
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return out
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _dotted_map(text: str, key: str) -> dict[str, dict[str, str]]:
    """The command-line form of a two-level map: ``"int8.min_agreement=0.98,fp16.min_agreement=0.99"``."""
    table: dict[str, dict[str, str]] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        path, sep, raw = item.partition("=")
        outer, dot, inner = path.strip().rpartition(".")
        if not sep or not dot or not outer:
            raise ConfigError(f"{key}: {item!r} is not KEY.FIELD=VALUE")
        table.setdefault(outer, {})[inner] = raw.strip()
    return table


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise with the valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    valid = field_names(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {valid}"
        )
    types_of, kwargs = hints(cls), {}
    for key, value in data.items():
        hint = types_of[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a section that validates itself (LossConfig) names the field
        raise ConfigError(f"{prefix}{exc}") from exc


def apply_override(data: dict, dotted: str, value: str, cls: type) -> None:
    """Set ``a.b.c=value`` in the nested dict after checking the path against the dataclasses."""
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        valid = field_names(node_cls)
        if part not in valid:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {dotted!r}: {part!r} is not one of {valid} (under {where})")
        hint = hints(node_cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"{dotted} is a section; set one of its keys: {field_names(hint)}")
            try:
                node[part] = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError as exc:  # e.g. optim.lr=[ : one line naming the key, exit 2
                problem = getattr(exc, "problem", None) or type(exc).__name__
                raise ConfigError(f"{dotted}={value!r}: not a valid YAML value ({problem})") from None
            if isinstance(node[part], (int, float)) and hint is str:
                node[part] = value  # keep "007"-like strings verbatim
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section")
        node = node.setdefault(part, {})
        node_cls = hint


def parse_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Dataclass ``cls`` from a YAML recipe (optional) and ``key=value`` overrides, not yet validated.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key (naming the valid ones) or a bad value.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level, got a {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        apply_override(data, key.strip(), value, cls)
    return from_dict(cls, data)


def plain(value: Any) -> Any:
    """``value`` with tuples as lists, nested dicts included: what YAML dumps as it reads back."""
    if isinstance(value, tuple):
        return [plain(x) for x in value]
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML dumps and model cards."""
    return plain(dataclasses.asdict(cfg))
