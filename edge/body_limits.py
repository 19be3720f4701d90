"""What a request body may contain before any of it reaches an actor: one parse, one walk.

Every route that takes a JSON body (/api/chat, /v1/chat/completions, thread sends, admin)
reads it through `load_json`, which parses the bytes and walks the result once, so that
whatever passes can be canonicalised (protocols/keys.py), msgpack-encoded
(protocols/codec.py) and sent upstream as UTF-8 without failing. What it refuses, and why:

| refused                                   | why                                            | status, code                  |
|-------------------------------------------|------------------------------------------------|-------------------------------|
| not JSON, not UTF-8/16/32                 |                                                | 400 `malformed_json`          |
| nesting deeper than `MAX_DEPTH` (64)      | recursion in json, msgpack and our own walks   | 400 `nesting_too_deep`        |
| an integer outside -2^63 .. 2^64-1        | msgpack cannot encode it (any 64-bit int can)  | 422 `integer_out_of_range`    |
|   (also one with more digits than that:   |   Python's int() refuses > 4300 digits with    |                               |
|   never converted, so never a ValueError) |   a ValueError that is not a JSONDecodeError)  |                               |
| NaN, Infinity, -Infinity, 1e999 (inf)     | not JSON (RFC 8259); Starlette cannot echo it  | 422 `non_finite_number`       |
| a string with a lone surrogate (\\ud800)   | cannot be encoded to UTF-8, hence not msgpack  | 422 `invalid_string`          |
| an array longer than `MAX_ARRAY_ITEMS`    | bounds the work per request                    | 422 `array_too_long`          |
| an object with more than `MAX_OBJECT_KEYS`|                                                | 422 `too_many_keys`           |
| an object key longer than `MAX_KEY_CHARS` |                                                | 422 `key_too_long`            |
| more than `MAX_VALUES` values in all      | bounds the walk's time on a 1 MiB body         | 422 `too_many_values`         |

Strings are otherwise bounded by the body limit (SLUICE_MAX_BODY_BYTES, 413 beyond):
a string can be no longer than the body that carries it. NUL characters are valid JSON
and are kept: they travel as "\\u0000" upstream and as plain characters in msgpack.

Each error names where it is, as a path like `messages[2].content` or `response_format.x`.
Errors are values for the caller: `BodyError(status, code, message)`.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
MAX_ARRAY_ITEMS = 10_000
MAX_OBJECT_KEYS = 1_000
MAX_KEY_CHARS = 256
MAX_VALUES = 100_000
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack's int formats hold
_MAX_INT_DIGITS = 20  # 2**64-1 has 20 digits: a longer literal is never converted


class BodyError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Refused:
    """Stands in for a literal json cannot hold safely; the walk reports it with its path."""

    __slots__ = ("code", "text")

    def __init__(self, code: str, text: str):
        self.code, self.text = code, text


def _parse_int(text: str) -> int | _Refused:
    digits = len(text) - text.startswith("-")
    if digits > _MAX_INT_DIGITS:
        return _Refused("integer_out_of_range", f"an integer of {digits} digits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        return _Refused("integer_out_of_range", f"the integer {value}")
    return value


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        return _Refused("non_finite_number", f"the number {text[:40]} (it overflows to infinity)")
    return value


def _parse_constant(text: str) -> _Refused:
    return _Refused("non_finite_number", f"{text} (not JSON)")


def load_json(raw: bytes) -> Any:
    """Parse and check a body (already within the size limit); raises BodyError."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise BodyError(400, "nesting_too_deep", f"the body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BodyError(400, "malformed_json", f"request body is not valid JSON: {_printable(str(exc))}") from None
    _Walk().value(data, [], 1)
    return data


class _Walk:
    def __init__(self) -> None:
        self.count = 0

    def value(self, value: Any, path: list, depth: int) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            raise BodyError(422, "too_many_values", f"the body holds more than {MAX_VALUES} values")
        if isinstance(value, str):
            self.string(value, path)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BodyError(400, "nesting_too_deep", f"{_where(path)} nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                self.object(value, path, depth)
            else:
                self.array(value, path, depth)
        elif isinstance(value, _Refused):
            what = "an integer between -2^63 and 2^64-1" if value.code == "integer_out_of_range" else "a finite number"
            raise BodyError(422, value.code, f"{_where(path)} must be {what}, got {value.text}")

    def object(self, obj: dict, path: list, depth: int) -> None:
        if len(obj) > MAX_OBJECT_KEYS:
            raise BodyError(422, "too_many_keys", f"{_where(path)} has {len(obj)} keys; the limit is {MAX_OBJECT_KEYS}")
        for key, item in obj.items():
            path.append(key)
            if len(key) > MAX_KEY_CHARS:
                raise BodyError(
                    422,
                    "key_too_long",
                    f"a key of {_where(path[:-1])} has {len(key)} characters; the limit is {MAX_KEY_CHARS}",
                )
            self.string(key, path, "key")
            self.value(item, path, depth + 1)
            path.pop()

    def array(self, items: list, path: list, depth: int) -> None:
        if len(items) > MAX_ARRAY_ITEMS:
            raise BodyError(
                422, "array_too_long", f"{_where(path)} has {len(items)} items; the limit is {MAX_ARRAY_ITEMS}"
            )
        for i, item in enumerate(items):
            path.append(i)
            self.value(item, path, depth + 1)
            path.pop()

    def string(self, text: str, path: list, what: str = "value") -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BodyError(
                422,
                "invalid_string",
                f"the {what} at {_where(path)} holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character "
                f"{exc.start}): it is not valid Unicode",
            ) from None


def _where(path: list) -> str:
    """`messages[2].content`; the body itself is `the body`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = _printable(part[:64])
            out += ("." if out else "") + (name if name.isidentifier() else json.dumps(name))
    if len(out) > 160:  # a path 64 levels deep: its head names the field
        out = out[:120] + "..."
    return out or "the body"


def _printable(text: str) -> str:
    """Text safe to put in an error message (no lone surrogates, no control characters)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
