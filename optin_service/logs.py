"""Logs: JSON lines by default, ``OPTIN_LOG_FORMAT=text`` for a human at a terminal.

One access line per request of the API (logger ``optin_service.access``) with
its request id, method, route template, status, duration and backend; the
application's own events; and, for an unexpected error, the stack trace in the
same line as the request id (never in the response).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from json import dumps as json_dumps
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

ACCESS = logging.getLogger("optin_service.access")
#: Structured fields a record may carry (passed as ``extra``), in display order.
FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms", "backend")
_TEXT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


class _TextFormatter(logging.Formatter):
    """The text format, with a record's structured fields after the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k)]
        if pairs:
            head, sep, trace = line.partition("\n")
            line = f"{head} {' '.join(pairs)}{sep}{trace}"
        return line


class _JsonFormatter(JsonFormatter):
    """python-json-logger's ``JsonFormatter``, with a fast path for plain records.

    A record with no exception, no stack and a string message (the access line,
    and most others) is written as the same JSON object, key for key and byte
    for byte, without the general machinery. Which attributes go out, under
    which names and in which order depends only on the record's attribute names:
    that plan is worked out once per set of names. Values of JSON's own types
    are encoded as ``json`` encodes them, and the time is formatted from a cached
    date and second. Anything else goes through ``JsonFormatter.format``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encode = JsonEncoder(ensure_ascii=self.json_ensure_ascii).encode
        self._encode_str = encode_basestring_ascii if self.json_ensure_ascii else encode_basestring
        self._fast = (
            self._required_fields == ["levelname", "name", "message"]
            and not self.defaults
            and not self.static_fields
            and not self.rename_fields_keep_missing
            and self.json_default is None
            and self.json_encoder is JsonEncoder
            and self.json_indent is None
            and self.json_serializer is json_dumps
            and type(self).process_log_record is JsonFormatter.process_log_record
            and isinstance(self.timestamp, str)
        )
        self._time_key = self._get_rename(self.timestamp) if self._fast else ""
        #: Attribute names of a record -> ('"key": ', attribute or None for the time) pairs.
        self._plans: dict[tuple[Any, ...], tuple[tuple[str, str | None], ...] | None] = {}

    def _plan(self, names: tuple[Any, ...]) -> tuple[tuple[str, str | None], ...] | None:
        """The output of a record with these attributes, as ``JsonFormatter`` builds it:
        the required fields, then the extras in record order, then the time, each
        under its renamed key (a later one with the same key takes the value, the
        first keeps the place). ``None`` when a key is not a string."""
        if "levelname" not in names or "name" not in names:
            return None
        rename, skip = self.rename_fields, self._skip_fields
        order: dict[Any, str | None] = {rename.get(f, f): f for f in self._required_fields}
        for name in names:
            if name not in skip and not (hasattr(name, "startswith") and name.startswith("_")):
                order[rename.get(name, name)] = name
        order[self._time_key] = None
        if not all(type(key) is str for key in order):
            return None
        return tuple((self._encode_str(key) + ": ", attr) for key, attr in order.items())

    def format(self, record: logging.LogRecord) -> str:
        if not self._fast or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        if not isinstance(record.msg, str):
            return super().format(record)
        record.message = record.getMessage()
        attrs = record.__dict__
        names = tuple(attrs)
        try:
            plan = self._plans[names]
        except KeyError:
            plan = self._plan(names)
            if len(self._plans) < 256:  # records with ever-new attributes stay uncached
                self._plans[names] = plan
        if plan is not None:
            encode_str = self._encode_str
            parts = []
            for key, attr in plan:
                if attr is None:
                    parts.append(key + encode_str(utc_isoformat(record.created)))
                    continue
                value = attrs[attr]
                if type(value) is str:  # most values: spare the call
                    parts.append(key + encode_str(value))
                    continue
                text = _json_scalar(value, encode_str)
                if text is None:  # not one of JSON's own types: the encoder decides
                    break
                parts.append(key + text)
            else:
                return self.prefix + "{" + ", ".join(parts) + "}"
        return self.prefix + self._encode(self._data(record))

    def _data(self, record: logging.LogRecord) -> dict[str, Any]:
        """The object ``JsonFormatter`` would encode for a plain record."""
        level, logger, message = (self._get_rename(f) for f in self._required_fields)
        data: dict[str, Any] = {
            level: record.levelname,
            logger: record.name,
            message: record.message,
        }
        skip, rename = self._skip_fields, self.rename_fields
        for key, value in record.__dict__.items():
            if key not in skip and not (hasattr(key, "startswith") and key.startswith("_")):
                data[rename.get(key, key)] = value
        data[self._time_key] = utc_isoformat(record.created)
        return data


_INFINITY = float("inf")


def _json_scalar(value: Any, encode_str: Callable[[str], str]) -> str | None:
    """``value`` as ``json`` writes it, for str, int, float, bool and None; else ``None``."""
    kind = type(value)
    if kind is str:
        return encode_str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if value != value:
            return "NaN"
        if value == _INFINITY:
            return "Infinity"
        if value == -_INFINITY:
            return "-Infinity"
        return float.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return None


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def utc_isoformat(created: float) -> str:
    """``datetime.fromtimestamp(created, tz=timezone.utc).isoformat()``, a few times faster.

    Microseconds are rounded as ``datetime`` rounds them (half to even, carried
    into the second); the date and time of day are formatted once per second.
    """
    if not 0 <= created < 253402300000:  # before 1970 or after 9999: datetime's way
        return datetime.fromtimestamp(created, tz=timezone.utc).isoformat()
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    seconds = int(whole)
    if micros >= 1_000_000:
        micros -= 1_000_000
        seconds += 1
    global _second
    cached = _second
    if cached[0] == seconds:
        head = cached[1]
    else:
        t = time.gmtime(seconds)
        head = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
        _second = (seconds, head)
    return f"{head}.{micros:06d}+00:00" if micros else head + "+00:00"


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``OPTIN_LOG_FORMAT`` (``json`` or ``text``)."""
    if fmt == "text":
        return _TextFormatter(_TEXT)
    if fmt != "json":
        raise ValueError(f"OPTIN_LOG_FORMAT must be json or text, not {fmt!r}")
    return _JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "trace"},
        timestamp="time",
    )


def configure(fmt: str) -> None:
    """Send the package's logs to stderr in ``fmt`` (standalone service only).

    An app that embeds the API keeps its own logging set-up: the package's
    loggers only emit records, with structured fields in ``extra``.
    """
    log = logging.getLogger("optin_service")
    handler = next((h for h in log.handlers if getattr(h, "_optin", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._optin = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    handler.setFormatter(formatter(fmt))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
