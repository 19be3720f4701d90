"""The msgpack codec every message type goes through: typed, tagged, versioned.

A message is a frozen dataclass registered with `@message("tag")`. On the wire it is
msgpack `[tag, version, {field: value}]`. Decoding checks the tag, the version and every
field's type, and returns an `Invalid` value instead of raising, so that a bad message can
be answered with an error reply and never escapes into Thespian as an exception (which
would make Thespian redeliver it and finally declare it poison).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

import msgpack

VERSION = 1

_REGISTRY: dict[str, type] = {}
_FIELD_TYPES: dict[type, dict[str, Any]] = {}
_REQUIRED: dict[type, frozenset[str]] = {}
# Per message class, made once: its field names in order (encode), and a check per field
# built from the type hints (from_wire). Every token crosses the hub as a StreamData, and
# reading the hints on every message (`typing.get_origin`, `get_args` per field) cost more
# than the msgpack work itself.
_NAMES: dict[type, tuple[str, ...]] = {}
_CHECKS: dict[type, dict[str, Callable[[Any], bool]]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class Invalid:
    """What `decode` returns for bytes that are not a valid message."""

    reason: str


_M = TypeVar("_M", bound=type)


@typing.dataclass_transform(frozen_default=True)  # type checkers see the fields as __init__'s
def message(tag: str) -> Callable[[_M], _M]:
    """Register a dataclass as a wire message under `tag`."""

    def register(cls: Any) -> Any:
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        if tag in _REGISTRY:
            raise ValueError(f"duplicate message tag {tag!r}")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return register


def encode(msg: Any) -> bytes:
    cls: type = type(msg)
    tag = getattr(cls, "TAG", None)
    if tag is None or _REGISTRY.get(tag) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered message")
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    body = {name: getattr(msg, name) for name in names}
    packed: bytes = msgpack.packb([tag, VERSION, body], use_bin_type=True)
    return packed


def decode(data: Any) -> Any:
    """bytes -> message instance, or `Invalid` saying what was wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return Invalid(f"expected msgpack bytes, got {type(data).__name__}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        return Invalid(f"not msgpack: {exc}")
    return from_wire(raw)


def from_wire(raw: Any) -> Any:
    """An already-unpacked `[tag, version, body]` -> message or `Invalid`."""
    if not (isinstance(raw, list) and len(raw) == 3):
        return Invalid("expected [tag, version, body]")
    tag, version, body = raw
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        return Invalid(f"unknown message type {tag!r}")
    if version != VERSION:
        return Invalid(f"{tag}: unsupported version {version!r} (expected {VERSION})")
    if not isinstance(body, dict):
        return Invalid(f"{tag}: body must be a map")
    checks = _CHECKS.get(cls) or _checks(cls)
    if not body.keys() <= checks.keys():
        return Invalid(f"{tag}: unknown field(s) {sorted(set(body) - set(checks))}")
    missing = _REQUIRED[cls] - body.keys()
    if missing:
        return Invalid(f"{tag}: missing field(s) {sorted(missing)}")
    for name, value in body.items():
        if not checks[name](value):
            hint = _FIELD_TYPES[cls][name]
            return Invalid(f"{tag}.{name}: expected {_type_name(hint)}, got {type(value).__name__}")
    return cls(**body)


def to_wire(msg: Any) -> list:
    """A message as the plain list msgpack would carry (for embedding in a stream)."""
    return [msg.TAG, VERSION, {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}]


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        _FIELD_TYPES[cls] = {n: hints[n] for n in names}
        _REQUIRED[cls] = frozenset(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
    return _FIELD_TYPES[cls]


def _checks(cls: type) -> dict[str, Callable[[Any], bool]]:
    checks = _CHECKS[cls] = {name: _checker(hint) for name, hint in _hints(cls).items()}
    return checks


def _checker(hint: Any) -> Callable[[Any], bool]:
    """Whether a value conforms to `hint` (a field's type hint), as a function of the value
    alone: the hint is read once per message class, not on every message."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = tuple(_checker(arg) for arg in typing.get_args(hint))
        return lambda value: any(check(value) for check in options)
    if hint is type(None):
        return lambda value: value is None
    if hint is Any:
        return lambda value: True
    if hint is float:
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, bytes):
        return lambda value: isinstance(value, hint)
    if hint is dict or origin is dict:
        return lambda value: isinstance(value, dict)
    if hint is list or origin is list:
        args = typing.get_args(hint)
        if not args:
            return lambda value: isinstance(value, list)
        if args[0] is dict or typing.get_origin(args[0]) is dict:  # list[dict]: StreamData's events
            return lambda value: isinstance(value, list) and all(isinstance(item, dict) for item in value)
        item_check = _checker(args[0])
        return lambda value: isinstance(value, list) and all(item_check(item) for item in value)
    return lambda value: False


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
