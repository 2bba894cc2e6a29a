"""``redis://``, ``rediss://`` and ``unix://``: opt-in state in Redis.

Keys per member, all sharing the hash tag ``{<correlation_id>}`` so they land in
one Cluster slot and one Lua call can change them together:

- ``<prefix>{<id>}``: the current state, ``<status>:<µs since epoch>:<source>:<request id>``;
- ``<prefix>{<id>}:h``: the history, a sorted set scored by µs, members
  ``<request id> <status> <source>`` (equal times sort by request id);
- ``<prefix>{<id>}:i:<Idempotency-Key>``: the fingerprint of the first request
  with that key, expiring after 24 hours.

Every write is one Lua script: the event, the current state and the
idempotency key change together or not at all.

A dead or hung Redis must cost a request about a second, not a minute:
redis-py's own defaults are 5 s timeouts with up to 10 retries, and ``from_url``
applies no retry at all. This backend sets short timeouts and one retry with a
small backoff (a retry is what reconnects after Redis restarts, so the service
recovers by itself). Every timeout can be overridden in the URL, for example
``redis://host:6379/0?socket_timeout=1&socket_connect_timeout=1``.

Query options of our own: ``prefix`` (default ``optin:``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    IdempotencyKeyReused,
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


# KEYS: current, history[, idempotency key]
# ARGV: µs, history member, current value, 1 if declined, fingerprint, key TTL (s)
# Returns {1, current, added} after a write, {0, current, 0} for a replay, {-1} on key reuse.
_SET_SCRIPT = """
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    if seen ~= ARGV[5] then return {-1} end
    return {0, redis.call('GET', KEYS[1]), 0}
  end
end
local added = redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
local current = redis.call('GET', KEYS[1])
local replace = not current
if current then
  local status, us = string.match(current, '^(%a+):(%d+):')
  local new_us, cur_us = tonumber(ARGV[1]), tonumber(us)
  replace = new_us > cur_us or (new_us == cur_us and ARGV[4] == '1' and status == 'accepted')
end
if replace then
  redis.call('SET', KEYS[1], ARGV[3])
  current = ARGV[3]
end
if #KEYS == 3 then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return {1, current, added}
"""
_KEY_TTL = int(IDEMPOTENCY_TTL.total_seconds())
_BATCH = 1000  # keys per SCAN step and commands per pipeline


class RedisStore(OptInStore):
    """Opt-in state in Redis, through a redis-py client (ours, or one passed in)."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = False
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._set_script = client.register_script(_SET_SCRIPT)

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
        return None if raw is None else _current(correlation_id, raw)

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        key = self.key(record.correlation_id)
        keys = [key, key + ":h"]
        if idempotency_key is not None:
            keys.append(f"{key}:i:{idempotency_key}")
        try:
            reply = self._set_script(keys, _args(record))
        except redis.RedisError as exc:
            raise _wrap(exc) from exc
        if reply[0] == -1:
            raise IdempotencyKeyReused(idempotency_key)
        return _current(record.correlation_id, reply[1])

    def history(
        self, correlation_id: str, limit: int, before: tuple[int, str] | None = None
    ) -> list[OptInRecord]:
        key = self.key(correlation_id) + ":h"
        top = "+inf" if before is None else before[0]
        found: list[OptInRecord] = []
        offset = 0
        try:
            # Events at the cursor's own time but not before it in request-id
            # order are skipped, so a page may need more than one fetch.
            while len(found) < limit:
                want = limit - len(found) + 1
                page = self.client.zrevrangebyscore(
                    key, top, "-inf", start=offset, num=want, withscores=True
                )
                for member, score in page:
                    event = _event(correlation_id, member, int(score))
                    if before is None or event.position < before:
                        found.append(event)
                if len(page) < want:
                    break
                offset += len(page)
        except redis.RedisError as exc:
            raise _wrap(exc) from exc
        return found[:limit]

    def import_events(self, records: Iterable[OptInRecord]) -> int:
        try:
            pipe = self.client.pipeline(transaction=False)
            for record in records:
                key = self.key(record.correlation_id)
                self._set_script([key, key + ":h"], _args(record), client=pipe)
            return sum(reply[2] for reply in pipe.execute())
        except redis.RedisError as exc:
            raise _wrap(exc) from exc

    def _history_keys(self) -> Iterator[list[bytes]]:
        pattern = self.prefix.replace("*", "\\*") + "{*}:h"
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=_BATCH, _type="zset"):
            batch.append(key)
            if len(batch) == _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def events(self, since: datetime | None = None) -> Iterator[OptInRecord]:
        low = "-inf" if since is None else OptInRecord("-", "accepted", since).updated_at_us
        start = len(self.prefix) + 1
        try:
            for keys in self._history_keys():
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.zrangebyscore(key, low, "+inf", withscores=True)
                for key, members in zip(keys, pipe.execute(), strict=True):
                    cid = key[start:-3].decode()
                    for member, score in members:
                        yield _event(cid, member, int(score))
        except redis.RedisError as exc:
            raise _wrap(exc) from exc

    def count_events(self) -> int:
        total = 0
        try:
            for keys in self._history_keys():
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.zcard(key)
                total += sum(pipe.execute())
        except redis.RedisError as exc:
            raise _wrap(exc) from exc
        return total

    def check(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _args(record: OptInRecord) -> list[object]:
    us = record.updated_at_us
    return [
        us,
        f"{record.request_id} {record.status} {record.source}",
        f"{record.status}:{us}:{record.source}:{record.request_id}",
        1 if record.status == "declined" else 0,
        record.fingerprint,
        _KEY_TTL,
    ]


def _current(correlation_id: str, raw: bytes) -> OptInRecord:
    status, us, source, request_id = raw.decode().split(":", 3)
    return OptInRecord.from_us(correlation_id, status, int(us), request_id, source)  # type: ignore[arg-type]


def _event(correlation_id: str, member: bytes, us: int) -> OptInRecord:
    request_id, status, source = member.decode().rsplit(" ", 2)
    return OptInRecord.from_us(correlation_id, status, us, request_id, source)  # type: ignore[arg-type]


def _wrap(exc: redis.RedisError) -> StorageError:
    kind = StorageUnavailable if isinstance(exc, _TRANSIENT) else StorageError
    return kind(f"redis: {exc}")
