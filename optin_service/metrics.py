"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, the shipped ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR``
at an empty folder before any worker starts; each worker then writes its
samples there and ``/metrics`` sums every worker's (prometheus-client's
multiprocess mode). Without that variable the process's own registry is used.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from .storage import StorageError, StorageUnavailable

REQUESTS = Counter(
    "optin_http_requests_total",
    "HTTP requests answered by the opt-in API.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "optin_http_request_duration_seconds",
    "Time to answer an HTTP request of the opt-in API.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STORAGE_SECONDS = Histogram(
    "optin_storage_operation_duration_seconds",
    "Time spent in a storage operation.",
    ["backend", "operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STORAGE_ERRORS = Counter(
    "optin_storage_errors_total",
    "Storage operations that failed, by kind (unavailable: 503; error: 500).",
    ["backend", "operation", "kind"],
)
CONSENT_CHANGES = Counter(
    "optin_consent_changes_total",
    "Consent events that became a member's current state, by the new status.",
    ["status"],
)


class storage_operation:
    """Time a storage call and count its failure, if any (a context manager).

    A class rather than ``@contextmanager`` (no generator per call), with the
    labelled children looked up once per (backend, operation).
    """

    __slots__ = ("_backend", "_operation", "_seconds", "_started")

    def __init__(self, backend: str, operation: str) -> None:
        key = (backend, operation)
        seconds = _storage_children.get(key)
        if seconds is None:
            seconds = _storage_children[key] = STORAGE_SECONDS.labels(backend, operation)
        self._seconds = seconds
        self._backend = backend
        self._operation = operation

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        self._seconds.observe(time.perf_counter() - self._started)
        if kind is not None and issubclass(kind, StorageError):
            failure = "unavailable" if issubclass(kind, StorageUnavailable) else "error"
            STORAGE_ERRORS.labels(self._backend, self._operation, failure).inc()


# Labelled children, looked up once: ``labels()`` checks and converts its
# arguments and takes a lock on every call. Routes are templates, so these stay small.
_storage_children: dict[tuple[str, str], Any] = {}
_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_consent_children: dict[str, Any] = {}


#: Methods counted by name; any other (gunicorn accepts any token) is "other", so a
#: client cannot add time series by inventing methods.
_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration."""
    if method not in _METHODS:
        method = "other"
    key = (route, method, status)
    children = _request_children.get(key)
    if children is None:
        children = _request_children[key] = (
            REQUESTS.labels(route, method, str(status)),
            REQUEST_SECONDS.labels(route, method),
        )
    children[0].inc()
    children[1].observe(seconds)


def consent_changed(status: str) -> None:
    """Count a PUT that became the member's current state."""
    child = _consent_children.get(status)
    if child is None:
        child = _consent_children[status] = CONSENT_CHANGES.labels(status)
    child.inc()


def exposition() -> tuple[bytes, str]:
    """The text to answer ``/metrics`` with, summed over workers when under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
