"""Logs: JSON lines by default, ``OPTIN_LOG_FORMAT=text`` for a human at a terminal.

One access line per request of the API (logger ``optin_service.access``) with
its request id, method, route template, status, duration and backend; the
application's own events; and, for an unexpected error, the stack trace in the
same line as the request id (never in the response).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from json import dumps as json_dumps
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
    and most others) is turned into the same JSON object, key for key and byte
    for byte, without the general machinery: one dict in record order, the time
    formatted directly, and one JSON encoder built once instead of per line.
    Anything else goes through ``JsonFormatter.format`` unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encode = JsonEncoder(ensure_ascii=self.json_ensure_ascii).encode
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
        self._names = tuple(self._get_rename(f) for f in self._required_fields)
        self._time_key = self._get_rename(self.timestamp) if self._fast else ""

    def format(self, record: logging.LogRecord) -> str:
        if not self._fast or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        if not isinstance(record.msg, str):
            return super().format(record)
        record.message = record.getMessage()
        level, logger, message = self._names
        data: dict[str, Any] = {
            level: record.levelname,
            logger: record.name,
            message: record.message,
        }
        skip, rename = self._skip_fields, self.rename_fields
        for key, value in record.__dict__.items():
            if key not in skip and not (hasattr(key, "startswith") and key.startswith("_")):
                data[rename.get(key, key)] = value
        data[self._time_key] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat()
        return self.prefix + self._encode(data)


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
