"""Logs: JSON lines by default, ``OPTIN_LOG_FORMAT=text`` for a human at a terminal.

One access line per request of the API (logger ``optin_service.access``) with
its request id, method, route template, status, duration and backend; the
application's own events; and, for an unexpected error, the stack trace in the
same line as the request id (never in the response).
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

ACCESS = logging.getLogger("optin_service.access")
#: Structured fields a record may carry (passed as ``extra``), in display order.
FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms", "backend")
_TEXT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
_HANDLER = "optin_service"


class _TextFormatter(logging.Formatter):
    """The text format, with a record's structured fields after the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k)]
        if pairs:
            head, sep, trace = line.partition("\n")
            line = f"{head} {' '.join(pairs)}{sep}{trace}"
        return line


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``OPTIN_LOG_FORMAT`` (``json`` or ``text``)."""
    if fmt == "text":
        return _TextFormatter(_TEXT)
    if fmt != "json":
        raise ValueError(f"OPTIN_LOG_FORMAT must be json or text, not {fmt!r}")
    return JsonFormatter(
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
    handler = next((h for h in log.handlers if h.get_name() == _HANDLER), None)
    if handler is None:  # configured once per process, whatever the number of apps
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER)
        log.addHandler(handler)
    handler.setFormatter(formatter(fmt))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
