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
import threading
import time
from collections.abc import Callable

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


#: The loggers the standalone service shows besides its own, at this level unless set
#: otherwise: Flask-Limiter's (it gives it a NullHandler: nothing shows unless set up),
#: the built-in backends', and psycopg's (its pool logs every failed connection
#: attempt at WARNING; at INFO, every connection handed out).
SHOWN = {"flask-limiter": logging.INFO, "backends": logging.INFO, "psycopg": logging.WARNING}
#: Libraries that can log on every request (Flask-Limiter, a failure to count; psycopg's
#: pool, each connection attempt while the server is down): one line of a kind per
#: :data:`LIBRARY_LOG_INTERVAL`. A filter sees its own logger's records only, not its
#: children's, hence psycopg.pool by name.
RATE_LIMITED = ("flask-limiter", "psycopg", "psycopg.pool")
#: Seconds between two records of one kind from a library reaching the log.
LIBRARY_LOG_INTERVAL = 60.0


class OncePer(logging.Filter):
    """Lets through one record of a kind (logger, level and message template) per
    ``seconds``; the next one let through carries ``suppressed``, how many were
    dropped in between. For a library that logs a failure on every request."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        #: Kind -> (when one was last let through, how many dropped since).
        self._seen: dict[tuple[str, int, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, record.msg)
        now = self._clock()
        with self._lock:
            last, dropped = self._seen.get(kind, (-math.inf, 0))
            if now - last < self.seconds:
                self._seen[kind] = (last, dropped + 1)
                return False
            self._seen[kind] = (now, 0)
        if dropped:
            record.suppressed = dropped
        return True


def configure(fmt: str) -> None:
    """Send the package's logs, and those of :data:`SHOWN`, to stderr in ``fmt``
    (standalone service only), libraries rate-limited (:data:`RATE_LIMITED`).

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
    for name, level in SHOWN.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if handler not in logger.handlers:
            logger.addHandler(handler)
    for name in RATE_LIMITED:
        library = logging.getLogger(name)
        if not any(isinstance(f, OncePer) for f in library.filters):
            library.addFilter(OncePer(LIBRARY_LOG_INTERVAL))
