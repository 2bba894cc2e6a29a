"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, the shipped ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR``
at an empty folder before any worker starts; each worker then writes its
samples there and ``/metrics`` sums every worker's (prometheus-client's
multiprocess mode). Without that variable the process's own registry is used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def storage_operation(backend: str, operation: str) -> Iterator[None]:
    """Time a storage call and count its failure, if any."""
    started = time.perf_counter()
    try:
        yield
    except StorageUnavailable:
        STORAGE_ERRORS.labels(backend, operation, "unavailable").inc()
        raise
    except StorageError:
        STORAGE_ERRORS.labels(backend, operation, "error").inc()
        raise
    finally:
        STORAGE_SECONDS.labels(backend, operation).observe(time.perf_counter() - started)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration."""
    REQUESTS.labels(route, method, str(status)).inc()
    REQUEST_SECONDS.labels(route, method).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The text to answer ``/metrics`` with, summed over workers when under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
