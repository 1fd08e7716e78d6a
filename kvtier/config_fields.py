"""Annotation-driven checks of the configuration dataclasses: a field's type and range come from its annotation.

``check_fields(section_object, "section")`` checks (and normalizes) every field of a section when it is
built, so a new field is checked with no code of its own:

- ``bool``: true or false only, never a string or a number. ``str``: a string.
- ``int``: an int (not a bool), >= 0 unless a ``Range`` in its ``Annotated`` says otherwise; with ``SIZE``
  (the ``Size`` / ``PositiveSize`` aliases) also a string with a binary unit, ``"64MiB"``.
- ``float``: a finite int or float, >= 0 unless a ``Range`` says otherwise (stored as a float).
- ``tuple[str, ...]``: a list or tuple of non-empty strings; one string is one item, never split into characters.
- ``Literal[...]``: one of the listed values. ``X | None``: ``None`` or an ``X``.
- A dataclass: an instance, or a table of its fields (through its ``from_dict`` where it has one).

Promises: a bad value raises ``ConfigError`` naming ``section.field`` and what it must be. ``text_value``
turns a command-line ``--set`` text into a value for a field: TOML syntax for numbers, booleans and arrays,
but the text as it is for a string field (a token or a path of digits stays a string).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from kvtier.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "kb": 1000, "mb": 1000**2,
          "gb": 1000**3, "tb": 1000**4}


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric setting (a plain int or float setting is ``Range(0)``: >= 0)."""

    low: float = 0
    high: float = math.inf


SIZE = "size"  # marks an int setting that also takes "64MiB"
Size = Annotated[int, SIZE]
PositiveSize = Annotated[int, SIZE, Range(1)]
Positive = Annotated[int, Range(1)]
Port = Annotated[int, Range(0, 65535)]


def parse_bytes(value: object, name: str) -> int:
    """An int of bytes from an int or a string such as ``"64MiB"``; ``ConfigError`` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(f"{name}: expected a size such as 4096 or '64MiB', got {value!r}")


def check_fields(obj: object, section: str) -> None:
    """Check every field of the dataclass ``obj`` against its annotation, storing the normalized values."""
    hints = _hints(type(obj))
    for item in dataclasses.fields(obj):  # type: ignore[arg-type]
        name = f"{section}.{item.name}" if section else item.name
        object.__setattr__(obj, item.name, _check(getattr(obj, item.name), hints[item.name], name))


def field_hint(cls: type[Any], field_name: str) -> Any:
    """The annotation of ``cls.field_name`` (``None`` for an unknown field)."""
    return _hints(cls).get(field_name)


def text_value(text: str, hint: Any) -> object:
    """The value of the command-line text ``text`` for a field annotated ``hint``."""
    core = _strip(hint)[0]
    if core is str or (get_origin(core) is tuple and not text.lstrip().startswith("[")):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return hints


def _strip(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``hint`` without ``Annotated`` (and without ``| None``), and its ``Annotated`` extras."""
    extras: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *rest = get_args(hint)
        extras = tuple(rest)
    if get_origin(hint) in (Union, types.UnionType):
        inner = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return _strip(inner[0])[0], extras
    return hint, extras


def _check(value: Any, hint: Any, name: str) -> Any:
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
    if value is None and optional:
        return None
    hint, extras = _strip(hint)
    bounds = next((extra for extra in extras if isinstance(extra, Range)), Range())
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if not any(value == choice and type(value) is type(choice) for choice in allowed):
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if get_origin(hint) is tuple:
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item for item in items):
            raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
        return tuple(items)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int or hint is float:
        return _number(parse_bytes(value, name) if SIZE in extras else value, hint, bounds, name)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _table(value, hint, name)
    raise ConfigError(f"{name} has an annotation the configuration cannot check: {hint!r}")


def _number(value: Any, kind: type, bounds: Range, name: str) -> int | float:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    if not (math.isfinite(value) and bounds.low <= value <= bounds.high):
        low = int(bounds.low) if bounds.low == int(bounds.low) else bounds.low
        limit = f"at least {low}" if bounds.high == math.inf else f"from {low} to {bounds.high:g}"
        raise ConfigError(f"{name} must be {what} {limit}, got {value!r}")
    return value if kind is int else float(value)


def _table(value: Any, cls: type[Any], name: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a table of {cls.__name__} fields, got {value!r}")
    build = getattr(cls, "from_dict", None)
    try:
        return build(dict(value)) if build is not None else cls(**value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc
