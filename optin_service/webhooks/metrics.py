"""The deliverer's Prometheus metrics, in a registry of their own.

The deliverer is its own process beside gunicorn and serves these on its own
port (``optin webhooks run --metrics-port``), so they never mix with the API's
per-worker metrics. Gauges are read when scraped, from the deliverer's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

#: The outcomes ``optin_webhook_deliveries_total`` counts, one per attempt.
OUTCOMES = ("delivered", "retried", "failed", "disabled")


class WebhookMetrics:
    """One deliverer's metrics (one instance per :class:`~.deliverer.Deliverer`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.waiting = Gauge(
            "optin_webhook_changes_waiting",
            "Changes in the feed after the delivery position (not yet delivered).",
            registry=self.registry,
        )
        self.oldest_age = Gauge(
            "optin_webhook_oldest_undelivered_age_seconds",
            "Age (from its updatedAt) of the oldest change not yet delivered; 0 if none.",
            registry=self.registry,
        )
        self.deliveries = Counter(
            "optin_webhook_deliveries",
            "Delivery attempts by outcome: delivered (2xx), retried (failed, will be "
            "retried), failed (retries ran out; delivery moved on), disabled (410).",
            ["outcome"],
            registry=self.registry,
        )
        self.disabled = Gauge(
            "optin_webhook_disabled",
            "1 while the endpoint is disabled (it answered 410; `optin webhooks enable`).",
            registry=self.registry,
        )
        self.lease_held = Gauge(
            "optin_webhook_lease_held",
            "1 while this deliverer holds the lease (is the one delivering).",
            registry=self.registry,
        )
        self.stalled = Gauge(
            "optin_webhook_position_expired",
            "1 while the stored position points into changes no longer kept "
            "(retention or a rebuild); `optin webhooks replay` resumes.",
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.deliveries.labels(outcome)

    def watch(
        self,
        waiting: Callable[[], float],
        oldest: Callable[[], float | None],
        held: Callable[[], bool],
    ) -> None:
        """Read the gauges from the deliverer at each scrape."""
        self.waiting.set_function(waiting)
        self.oldest_age.set_function(lambda: _age(oldest()))
        self.lease_held.set_function(lambda: 1.0 if held() else 0.0)

    def count(self, outcome: str) -> None:
        self.deliveries.labels(outcome).inc()

    def serve(self, port: int, address: str) -> None:
        """Serve ``/metrics`` on ``address:port`` from a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)


def _age(moment: float | None) -> float:
    return 0.0 if moment is None else max(0.0, time.time() - moment)
