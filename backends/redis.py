"""``redis://``, ``rediss://`` and ``unix://``: opt-in state in Redis.

One string key per member, ``<prefix>{<correlation_id>}`` holding
``<status>:<microseconds since epoch>``. The braces are a hash tag, so every key
a member will ever have lands in the same Cluster slot.

A dead or hung Redis must cost a request about a second, not a minute:
redis-py's own defaults are 5 s timeouts with up to 10 retries, and ``from_url``
applies no retry at all. This backend sets short timeouts and one retry with a
small backoff (a retry is what reconnects after Redis restarts, so the service
recovers by itself). Every timeout can be overridden in the URL, for example
``redis://host:6379/0?socket_timeout=1&socket_connect_timeout=1``.

Query options of our own: ``prefix`` (default ``optin:``).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from optin_service.storage import (
    OptInRecord,
    OptInStore,
    StorageError,
    StorageUnavailable,
)

DEFAULT_PREFIX = "optin:"
SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
# Errors that mean "not now" rather than "never": no connection, a timeout, a
# server loading its data set (a ConnectionError), a failover in progress (a
# write to a demoted master, a replica that lost its master), a slot moving.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


class RedisStore(OptInStore):
    """Opt-in state in Redis, through a redis-py client (ours, or one passed in)."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = False
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        parts = urlsplit(url)
        options = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in options if k == "prefix"), DEFAULT_PREFIX)
        rest = urlencode([(k, v) for k, v in options if k != "prefix"])
        client = redis.Redis.from_url(
            urlunsplit(parts._replace(query=rest)),
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),
        )
        return cls(client, prefix=prefix, owns_client=True)

    def key(self, correlation_id: str) -> str:
        """The key holding a member's current state (hash-tagged by member)."""
        return f"{self.prefix}{{{correlation_id}}}"

    def get(self, correlation_id: str) -> OptInRecord | None:
        try:
            raw = self.client.get(self.key(correlation_id))
        except redis.RedisError as exc:
            raise _wrap(exc) from exc
        if raw is None:
            return None
        status, _, micros = raw.decode().partition(":")
        return OptInRecord.from_us(correlation_id, status, int(micros))  # type: ignore[arg-type]

    def set(self, record: OptInRecord) -> OptInRecord:
        value = f"{record.status}:{record.updated_at_us}"
        try:
            self.client.set(self.key(record.correlation_id), value)
        except redis.RedisError as exc:
            raise _wrap(exc) from exc
        return record

    def check(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _wrap(exc: redis.RedisError) -> StorageError:
    kind = StorageUnavailable if isinstance(exc, _TRANSIENT) else StorageError
    return kind(f"redis: {exc}")
