"""Strict JSON: one object, no NaN, no Infinity, no duplicate keys.

The standard ``json`` module accepts NaN, Infinity and duplicate keys; a
consent body that says both "accepted" and "declined" is not consent, so the
parser here rejects all three before marshmallow sees the data.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .formats import cut


class _BadJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a valid JSON value")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # a key came twice: name the first that did
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadJSON(f"Duplicate key in JSON body: {cut(key)}")
            seen.add(key)
    return obj


def _finite(text: str) -> float:
    """A JSON number as a float; one past a double's range (1e999) would be Infinity."""
    value = float(text)
    if math.isinf(value):
        raise _BadJSON(f"{cut(text)} is too large for a JSON number")
    return value


# Built once: json.loads with hooks builds a new decoder and scanner on every call.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite, object_pairs_hook=_reject_duplicates
)


def loads_object(text: str | bytes, what: str = "Request body") -> dict[str, Any]:
    """One JSON object, strictly: no NaN/Infinity, no duplicate keys, UTF-8.

    Raises ``ValueError`` with a message fit for a client, naming ``what`` was read.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise ValueError("Unexpected UTF-8 BOM")
        value = _DECODER.decode(text)
    except _BadJSON:
        raise
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value
