"""``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``, ``redis+cluster://``: Redis.

Keys per member, all sharing the hash tag ``{<correlation_id>}`` so they land in
one Cluster slot and one Lua call can change them together:

- ``<prefix>{<id>}``: the current state, ``<µs since epoch><1 if declined else 0>``:
  digits only, so Redis keeps it as an integer inside the key's object (no
  string allocated: about 90 bytes per member instead of 170). The rest of the
  current event (request id, source, client) is read from the history: it is
  the event at that time and status with the greatest request id;
- ``<prefix>{<id>}:h``: the history, a sorted set scored by µs, members
  ``<request id> <status> <source>`` (equal times sort by request id);
- ``<prefix>{<id>}:i:<Idempotency-Key>``: the fingerprint of the first request
  with that key, expiring after 24 hours.

The caller (``client``) of an event, when there is one, follows a newline in
the history member (its own backslashes and
newlines escaped as ``\\\\`` and ``\\n``); a history member also gets
``\\n<µs>`` when the same words were already stored at another time. ``}`` and
``%`` in an id (the API accepts neither) are escaped as ``%7D`` and ``%25``.

Every write is one Lua script: the event, the current state and the
idempotency key change together or not at all (the current state is read and
checked before anything is written). An event is its member, time and request
id: one already stored is skipped whole, whatever its other fields say.

A dead or hung Redis must cost a request about a second, not a minute:
redis-py's own defaults are 5 s timeouts with up to 10 retries, and ``from_url``
applies no retry at all. This backend sets short timeouts and one retry with a
small backoff (a retry is what reconnects after Redis restarts, so the service
recovers by itself). Every timeout can be overridden in the URL, for example
``redis://host:6379/0?socket_timeout=1&socket_connect_timeout=1``.

Beyond one server, only the URL changes:

- ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``:
  the master of ``service_name`` as the Sentinels name it, found again after a
  failover (on every new connection, and at least once a second even on warm
  ones, so writes stop going to a demoted master within about a second).
  ``user:password`` are the data nodes'; ``sentinel_username`` and
  ``sentinel_password`` query options are the Sentinels' own, if they have any.
- ``redis+cluster://[user:password@]host:port[,host:port...]``: a Redis Cluster,
  reached through any of the listed nodes. A member's keys share one slot, so
  its atomic write works there; a write that meets a slot being migrated
  (``TRYAGAIN``) is retried briefly here before answering "unavailable".

Query options of our own, on every scheme:

- ``prefix`` (default ``optin:``);
- ``min_replicas_acked`` (default: the ``OPTIN_REDIS_MIN_REPLICAS_ACKED``
  environment variable, else 0): after each write, ``WAIT`` on the same
  connection until that many replicas have it, else the write is reported as
  unavailable (a 503: the event may still be on the master, and a retry with
  the same ``Idempotency-Key`` is safe);
- ``wait_timeout_ms`` (default 500): how long that ``WAIT`` may take.

On ``redis+sentinel`` and ``redis+cluster`` the only other options are
``socket_timeout`` and ``socket_connect_timeout`` (seconds).

A member's keys have no TTL, so under an ``allkeys-*`` eviction policy Redis may
drop them to free memory: consent acknowledged, then gone. The store reads
``maxmemory_policy`` from ``INFO memory`` (``CONFIG`` is often disabled on managed
Redis, and the policy can change at runtime) before writing, at most once a
second while it is safe, and refuses to write (:class:`StorageUnavailable`) under
any policy but ``noeviction`` and ``volatile-*``; on a Cluster, every master's
policy counts. A server that does not answer ``INFO`` (a proxy, an ACL without
it) cannot be checked: writes go ahead, and a warning says so once per store.
``check()`` reads the policy every time and writes a short-lived key of its own
on every master, so it fails whenever a write would (read-only replica,
``NOREPLICAS``, ``OOM``, ``MISCONF``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from optin_service.storage import (
    IDEMPOTENCY_TTL,
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    OptInStore,
    StorageError,
    StorageUnavailable,
    batched,
)

DEFAULT_PREFIX = "optin:"
SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
#: Per Sentinel asked: they are asked in turn, so three hung ones cost 0.6 s.
SENTINEL_TIMEOUT = 0.2
#: The environment variable giving ``min_replicas_acked`` when the URL does not.
MIN_REPLICAS_ENV = "OPTIN_REDIS_MIN_REPLICAS_ACKED"
DEFAULT_WAIT_TIMEOUT_MS = 500
#: How often a Sentinel store asks the Sentinels who the master is, at most.
MASTER_RECHECK_SECONDS = 1.0
#: How long a store trusts a safe eviction policy it read before reading it again.
POLICY_RECHECK_SECONDS = 1.0
#: The eviction policies that never evict a key without a TTL (a member's state and
#: history have none); any other (``allkeys-*``, or one we do not know) may.
_KEEPING_POLICIES = re.compile(r"noeviction|volatile-[a-z]+")
#: How long check()'s own key lives: it proves a write, then goes.
CHECK_KEY_SECONDS = 10
#: Cluster: tags tried to find a check() key on every master. A master owning
#: about a thousandth of the slots or less may get none (its policy is still read).
_CHECK_TAGS = 8192
#: How long a Cluster store keeps retrying a write that meets a slot in migration.
CLUSTER_RETRY_SECONDS = 2.0
_CLUSTER_ATTEMPTS = 40

# Errors that mean "not now" rather than "never": no connection, a timeout, a
# server loading its data set (a ConnectionError), a failover in progress (a
# write to a demoted master, a replica that lost its master, no master known to
# the Sentinels), a slot moving or uncovered, a cluster that cannot be reached.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    ClusterError,  # ClusterDownError, and "TTL exhausted" after many redirections
    TryAgainError,
    AskError,  # and MovedError
    RedisClusterException,  # no node reachable, a slot not covered
    redis.exceptions.OutOfMemoryError,  # maxmemory reached with noeviction: until memory frees
)
# Replies (plain ResponseErrors to redis-py) by which a server refuses for now:
# fewer replicas than min-replicas-to-write, a script running past its time
# limit, a failed save with stop-writes-on-bgsave-error. In a pipeline, redis-py
# puts "Command # N (...) of pipeline caused error: " before the reply.
_REFUSED_FOR_NOW = re.compile(r"(?:^|caused error: )(?:NOREPLICAS|BUSY|MISCONF) ")
# What redis-py raises: RedisClusterException is not a RedisError.
_DRIVER_ERRORS = (redis.RedisError, RedisClusterException)
T = TypeVar("T")
R = TypeVar("R")
_OUR_OPTIONS = ("prefix", "min_replicas_acked", "wait_timeout_ms")
_TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
log = logging.getLogger(__name__)


# Shared by the scripts. A state value is ``<µs><0|1>``; µs are compared as
# decimal strings, never as Lua numbers (doubles: inexact beyond 2^53).
# ``state`` reads a member's current state: the value, its µs and its declined
# flag (nil if none; an error, before any write, if unparsable). ``event_of``
# finds the member of the current event in the history. ``apply`` stores one
# event unless it is stored already (an event is its member, time and request
# id: one already stored is skipped whole) and makes it the current state if it
# takes precedence: newer; as new and declined over accepted; then the greater
# request id. It returns the current value, 1 if the event was added (else 0),
# and whether the event is now the current state.
_FUNCTIONS = """
local function state(key)
  local current = redis.call('GET', key)
  if not current then return nil end
  local us, declined = string.match(current, '^(%-?%d+)([01])$')
  if not us then error({err = 'ERR unparsable opt-in state in ' .. key}) end
  return current, us, declined
end

-- a > b byte by byte, as Python compares the ids: Lua's > uses strcoll, which
-- follows redis-server's locale (under en_US, 'B' sorts after 'a')
local function after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- a > b, for integers written in decimal without leading zeros
local function greater(a, b)
  local a_negative, b_negative = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if a_negative ~= b_negative then return b_negative end
  if #a ~= #b then return (#a > #b) ~= a_negative end
  if a == b then return false end
  return after(a, b) ~= a_negative
end

-- The request id and member of the current event among the members at its µs:
-- of those with its status, the greatest request id.
local function newest(members, declined)
  local status = declined == '1' and 'declined' or 'accepted'
  local best_rid, best
  for _, member in ipairs(members) do
    local rid, their_status = string.match(member, '^([^\\n]*) (%a+) [^ \\n]+')
    if their_status == status and (not best_rid or after(rid, best_rid)) then
      best_rid, best = rid, member
    end
  end
  return best_rid, best
end

local function event_of(history, us, declined)
  local _, member = newest(redis.call('ZRANGEBYSCORE', history, us, us), declined)
  return member or false
end

local function apply(key, history, us, member, value, declined, rid, current, cur_us, cur_declined)
  local same_time = redis.call('ZRANGEBYSCORE', history, us, us)
  for _, stored in ipairs(same_time) do
    local head = string.match(stored, '^[^\\n]*')
    if string.match(head, '^(.*) [^ ]+ [^ ]+$') == rid then return current, 0, false end
  end
  local replace = not current
  if current then
    if us ~= cur_us then
      replace = greater(us, cur_us)
    elseif declined ~= cur_declined then
      replace = declined == '1'
    else  -- the current event is among same_time
      replace = after(rid, newest(same_time, cur_declined) or '')
    end
  end
  if redis.call('ZSCORE', history, member) then
    -- The same words at another time: another event, kept apart by its time.
    if not string.find(member, '\\n', 1, true) then member = member .. '\\n' end
    member = member .. '\\n' .. us
  end
  redis.call('ZADD', history, us, member)
  if replace then
    redis.call('SET', key, value)
    current = value
  end
  return current, 1, replace
end
"""

# One write. KEYS: current, history[, idempotency key]
# ARGV: µs, history member, state value, 1 if declined, request id, fingerprint,
#       key TTL (s)[, 1 to touch: write the current state back when nothing else was
#       written, so that a WAIT after a replay also covers the write being replayed]
# Returns {1, state, added, member} after a write, {0, state, 0, member} for a replay,
# {-1} on key reuse; member: the current event's history member, or nil when the
# event written is the current state.
_SET_SCRIPT = (
    _FUNCTIONS
    + """
local touch = ARGV[8] == '1'
local current, cur_us, cur_declined = state(KEYS[1])
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    if seen ~= ARGV[6] then return {-1} end
    if not current then return {0, false, 0, false} end
    if touch then redis.call('SET', KEYS[1], current, 'KEEPTTL') end
    return {0, current, 0, event_of(KEYS[2], cur_us, cur_declined)}
  end
end
local added, replaced
current, added, replaced = apply(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                                 ARGV[5], current, cur_us, cur_declined)
if added == 0 and touch and current and #KEYS < 3 then
  redis.call('SET', KEYS[1], current, 'KEEPTTL')
end
if #KEYS == 3 then redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7]) end
if replaced or not current then return {1, current or false, added, false} end
local _, us, declined = state(KEYS[1])
return {1, current, added, event_of(KEYS[2], us, declined)}
"""
)

# A read: the state value and the current event's history member, or nil.
_GET_SCRIPT = (
    _FUNCTIONS
    + """
local current, us, declined = state(KEYS[1])
if not current then return false end
return {current, event_of(KEYS[2], us, declined)}
"""
)

# Many events, of any members (one server or Sentinel: not Cluster, whose scripts
# reach one slot). KEYS: current and history of each event in turn.
# ARGV: 1 to touch (as above), then µs, history member, current value, 1 if
#       declined, request id of each event. Returns how many events were added.
# Each event is read, checked and written in turn, so each is all or nothing.
_IMPORT_SCRIPT = (
    _FUNCTIONS
    + """
local touch = ARGV[1] == '1'
local added = 0
for i = 1, #KEYS, 2 do
  local a = (i - 1) / 2 * 5 + 1
  local current, cur_us, cur_declined = state(KEYS[i])
  local _, new = apply(KEYS[i], KEYS[i + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                       ARGV[a + 4], ARGV[a + 5], current, cur_us, cur_declined)
  if new == 0 and touch and current then redis.call('SET', KEYS[i], current, 'KEEPTTL') end
  added = added + new
end
return added
"""
)
# Events of each history key in KEYS, at or after ARGV[1] µs: for each key, a
# flat list of member, score... (one call per SCAN page instead of one per key).
_RANGES_SCRIPT = """
local found = {}
for i, key in ipairs(KEYS) do
  found[i] = redis.call('ZRANGEBYSCORE', key, ARGV[1], '+inf', 'WITHSCORES')
end
return found
"""
_COUNT_SCRIPT = """
local total = 0
for _, key in ipairs(KEYS) do total = total + redis.call('ZCARD', key) end
return total
"""
#: Events per call of the import script: about a millisecond of Redis's time.
_SCRIPT_EVENTS = 100
_KEY_TTL = int(IDEMPOTENCY_TTL.total_seconds())
_EXACT = 2**53  # µs: beyond, a sorted-set score (a double) rounds (storage.EARLIEST/LATEST)
_BATCH = 1000  # keys per SCAN step and commands per pipeline

#: One write: the script's KEYS and ARGV.
_Call = tuple[list[str], list[object]]


class RedisStore(OptInStore):
    """Opt-in state in Redis, through a redis-py client (ours, or one passed in).

    With ``min_replicas_acked`` N > 0, every write is followed by ``WAIT N
    wait_timeout_ms`` on the same connection, and fails with
    :class:`StorageUnavailable` unless N replicas acknowledged it.
    """

    #: Until when (``time.monotonic()``) the eviction policy last read is trusted.
    _policy_ok_until = 0.0
    #: Whether the warning that the policy cannot be read was given.
    _warned_unread_policy = False

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = False,
        min_replicas_acked: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._set_waiting(min_replicas_acked, wait_timeout_ms)
        self._set_script = client.register_script(_SET_SCRIPT)
        self._get_script = client.register_script(_GET_SCRIPT)
        self._import_script = client.register_script(_IMPORT_SCRIPT)
        self._ranges_script = client.register_script(_RANGES_SCRIPT)
        self._count_script = client.register_script(_COUNT_SCRIPT)

    def _set_waiting(self, min_replicas_acked: int, wait_timeout_ms: int) -> None:
        if min_replicas_acked < 0:
            raise ValueError(f"min_replicas_acked must be 0 or more, not {min_replicas_acked}")
        if wait_timeout_ms < 1:  # WAIT n 0 would block forever
            raise ValueError(f"wait_timeout_ms must be 1 or more, not {wait_timeout_ms}")
        self.min_replicas_acked = min_replicas_acked
        self.wait_timeout_ms = wait_timeout_ms

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        scheme = urlsplit(url).scheme
        if scheme == "redis+sentinel":
            return RedisSentinelStore.from_url(url)
        if scheme == "redis+cluster":
            return RedisClusterStore.from_url(url)
        parts = urlsplit(url)
        if parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]+/?", parts.path):
            # redis-py would read "/tenant2" as database 0: another tenant's, maybe.
            raise ValueError(f"a {parts.scheme}:// URL's database is /<number>, not {parts.path}")
        options = _options(parts.query)
        prefix = next((v for k, v in options if k == "prefix"), DEFAULT_PREFIX)
        replicas, wait_ms = _waiting(options)
        rest = urlencode([(k, v) for k, v in options if k not in _OUR_OPTIONS])
        # The URL as given with only our options taken out: urlunsplit() would turn
        # unix:///path into unix:/path, which redis-py refuses.
        client = redis.Redis.from_url(
            url.partition("?")[0] + (f"?{rest}" if rest else ""),
            socket_timeout=_socket_timeout(SOCKET_TIMEOUT, replicas, wait_ms),
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=_retry(),
        )
        _refuse_unknown_driver_options(client.connection_pool, parts.scheme)
        return cls(
            client,
            prefix=prefix,
            owns_client=True,
            min_replicas_acked=replicas,
            wait_timeout_ms=wait_ms,
        )

    def key(self, correlation_id: str) -> str:
        """The key holding a member's current state (hash-tagged by member).

        ``}`` and ``%`` in an id (never in one the API accepts) are escaped, so
        the hash tag is the whole id and no member's keys can be another's.
        """
        return f"{self.prefix}{{{_escape(correlation_id)}}}"

    def get(self, correlation_id: str) -> OptInRecord | None:
        key = self.key(correlation_id)
        try:
            client = self.client  # first: a Cluster store builds it, and its scripts, on first use
            found = self._get_script([key, key + ":h"], client=client)
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc
        return None if found is None else _current(correlation_id, *found)

    def _check_key(self, tag: str = "") -> str:
        """check()'s key. An escaped id holds ``%`` only as ``%25`` or ``%7D``, so the
        hash tag ``{%check...}`` is no member's."""
        return f"{self.prefix}{{%check{tag}}}"

    def _policies(self) -> list[tuple[str, str | None]]:
        """(server, ``maxmemory_policy``) of each server the store writes to."""
        return [("the server", _policy_of(self.client))]

    def _check_policy(self) -> None:
        """Raise :class:`StorageUnavailable` if a server may evict keys without a TTL."""
        unread = []
        for server, policy in self._policies():
            if policy is None:
                unread.append(server)
            elif not _KEEPING_POLICIES.fullmatch(policy):
                raise StorageUnavailable(
                    f"redis: {server} has maxmemory-policy {policy}, under which Redis may "
                    "evict a member's consent to free memory; refusing to write until it is "
                    "noeviction (or a volatile-* policy)"
                )
        if unread and not self._warned_unread_policy:
            self._warned_unread_policy = True
            log.warning(
                "redis: %s does not answer INFO memory, so its maxmemory-policy cannot be "
                "checked; make sure it is noeviction (allkeys-* policies evict consent)",
                ", ".join(unread),
            )

    def _refuse_if_evicting(self) -> None:
        """:meth:`_check_policy`, trusted for :data:`POLICY_RECHECK_SECONDS` once it passes
        (a refusal is not cached: writes resume as soon as the policy is fixed)."""
        now = time.monotonic()
        if now >= self._policy_ok_until:
            self._check_policy()
            self._policy_ok_until = now + POLICY_RECHECK_SECONDS

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        key = self.key(record.correlation_id)
        keys = [key, key + ":h"]
        if idempotency_key is not None:
            keys.append(f"{key}:i:{idempotency_key}")
        try:
            self._refuse_if_evicting()
            reply = self._write(keys, _args(record.row, touch=self.min_replicas_acked > 0))
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc
        if reply[0] == -1:
            raise IdempotencyKeyReused(idempotency_key)
        if reply[0] == 1 and reply[1] is not None and reply[3] is None:
            return record  # it is the current state now
        return _current(record.correlation_id, reply[1], reply[3])

    def _write(self, keys: list[str], args: list[object]) -> list:
        """Run the write script once: alone, or followed by WAIT on the same connection."""
        if not self.min_replicas_acked:
            return self._set_script(keys, args)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(self._set_script.sha, len(keys), *keys, *args)
            self._queue_wait(pipe)
            reply, acked = pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 0:
                self.client.script_load(_SET_SCRIPT)
                continue
            if isinstance(reply, Exception):
                raise reply
            if reply[0] != -1:  # a refused key wrote nothing: nothing to wait for
                self._check_acked(acked)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _queue_wait(self, pipe: redis.client.Pipeline) -> None:
        pipe.execute_command("WAIT", self.min_replicas_acked, self.wait_timeout_ms)

    def _check_acked(self, acked: object) -> None:
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.min_replicas_acked:  # type: ignore[call-overload]
            raise StorageUnavailable(
                f"redis: the write reached {acked} of the {self.min_replicas_acked} replicas "
                f"required within {self.wait_timeout_ms} ms; it may still be applied, and "
                "a retry with the same Idempotency-Key is safe"
            )

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
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc
        return found[:limit]

    def import_events(self, records: Iterable[OptInRecord]) -> int:
        return self.import_rows(record.row for record in records)

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """:data:`_SCRIPT_EVENTS` events per script call, :data:`_BATCH` calls' worth of
        events per pipeline (ending with WAIT when replicas must acknowledge); the
        next pipeline is built while Redis runs the previous one."""
        touch = self.min_replicas_acked > 0
        batches = batched(rows, _BATCH * 5)
        pipelines = (self._import_pipeline(batch, touch) for batch in batches)
        try:
            self._refuse_if_evicting()
            return sum(_overlapped(pipelines, functools.partial(self._run_import, touch=touch)))
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc

    def _import_pipeline(self, batch: list[EventRow], touch: bool) -> redis.client.Pipeline:
        pipe = self.client.pipeline(transaction=False)
        key = self.key
        for start in range(0, len(batch), _SCRIPT_EVENTS):
            keys: list[str] = []
            args: list[object] = [1 if touch else 0]
            for row in batch[start : start + _SCRIPT_EVENTS]:
                current = key(row[0])
                keys += (current, current + ":h")
                args += _event_args(row)
            self._import_script(keys, args, client=pipe)
        if touch:
            self._queue_wait(pipe)
        return pipe

    def _run_import(self, pipe: redis.client.Pipeline, touch: bool) -> int:
        replies = pipe.execute()
        if touch:
            self._check_acked(replies.pop())
        return sum(replies)

    def _escaped_id(self, history_key: bytes) -> bytes:
        """The id part of ``<prefix>{<id>}:h``, cut after the prefix's bytes (not its
        letters: the prefix may not be ASCII)."""
        return history_key[len(self.prefix.encode()) + 1 : -3]

    def _history_keys(self) -> Iterator[list[bytes]]:
        pattern = _GLOB_CHARS.sub(r"\\\g<0>", self.prefix) + "{*}:h"  # the prefix literally
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=_BATCH, _type="zset"):
            if b"}" in self._escaped_id(key):  # ids are escaped: another prefix's ("" and "{x}:")
                continue
            batch.append(key)
            if len(batch) == _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def events(self, since: datetime | None = None) -> Iterator[OptInRecord]:
        for row in self.rows(since):
            yield OptInRecord.from_row(row)

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        low = "-inf" if since is None else OptInRecord("-", "accepted", since).updated_at_us
        try:
            for keys in self._history_keys():
                for key, pairs in zip(keys, self._ranges(keys, low), strict=True):
                    cid = _unescape(self._escaped_id(key).decode())
                    for member, score in pairs:
                        yield _event_row(cid, member, score)
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc

    def _ranges(self, keys: list[bytes], low: object) -> Iterator[Iterable[tuple[bytes, Any]]]:
        """For each history key, its (member, score) pairs at or after ``low``."""
        for flat in self._ranges_script(keys, [low]):
            yield zip(flat[::2], flat[1::2], strict=True)

    def count_events(self) -> int:
        try:
            return sum(self._count(keys) for keys in self._history_keys())
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc

    def _count(self, keys: list[bytes]) -> int:
        """How many events the history keys hold, together."""
        return self._count_script(keys)

    def check(self) -> None:
        """Unavailable unless a write would succeed now: the eviction policy (read
        afresh) keeps keys, and a short-lived key of the store's own is written."""
        try:
            self._check_policy()
            self.client.set(self._check_key(), 1, ex=CHECK_KEY_SECONDS)
        except _DRIVER_ERRORS as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _policy_of(client: redis.Redis) -> str | None:
    """The server's ``maxmemory_policy`` from ``INFO memory``; ``None`` if it does not
    answer INFO (unknown to a proxy or to fakeredis, or denied by an ACL)."""
    try:
        info = client.info("memory")
    except redis.exceptions.NoPermissionError:
        return None
    except redis.ResponseError as exc:
        if str(exc).lower().startswith("unknown command"):
            return None
        raise
    return info.get("maxmemory_policy")


# --- Sentinel ---------------------------------------------------------------------


class _MasterPool(SentinelConnectionPool):
    """Sentinel's pool for a master, asking the Sentinels again at least once a second.

    redis-py asks the Sentinels only when it opens a connection, so a warm
    connection to a master that a failover demoted keeps writing there (and
    those writes are discarded when it becomes a replica) until Sentinel
    reconfigures it, which takes about ten seconds by default. Here, when the
    Sentinels name another master, idle connections are closed and the next
    command connects to the new one.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: object) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0

    def get_connection(self, *args: object, **kwargs: object) -> redis.Connection:
        now = time.monotonic()
        # Without an idle connection a new one is opened, and that asks the Sentinels.
        if now >= self._next_check and self._available_connections:
            self._next_check = now + MASTER_RECHECK_SECONDS
            try:
                self.get_master_address()  # closes idle connections if the master moved
            except redis.ConnectionError:  # no Sentinel answers: keep the master we know
                pass
        return super().get_connection(*args, **kwargs)


class RedisSentinelStore(RedisStore):
    """``redis+sentinel://``: the master of a Sentinel-monitored service."""

    def __init__(
        self,
        sentinel: Sentinel,
        service_name: str,
        *,
        db: int = 0,
        prefix: str = DEFAULT_PREFIX,
        min_replicas_acked: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        **connection_kwargs: object,
    ) -> None:
        client = sentinel.master_for(
            service_name, connection_pool_class=_MasterPool, db=db, **connection_kwargs
        )
        super().__init__(
            client,
            prefix=prefix,
            owns_client=True,
            min_replicas_acked=min_replicas_acked,
            wait_timeout_ms=wait_timeout_ms,
        )
        self.sentinel = sentinel
        self.service_name = service_name

    @classmethod
    def from_url(cls, url: str) -> RedisSentinelStore:
        parts = urlsplit(url)
        if parts.scheme != "redis+sentinel":
            raise ValueError(f"not a redis+sentinel:// URL: {parts.scheme}://...")
        username, password, hosts = _netloc(parts.netloc, default_port=26379)
        path = [unquote(p) for p in parts.path.split("/")[1:]]
        if len(path) == 2 and path[1] == "":
            path.pop()
        if not 1 <= len(path) <= 2 or not path[0]:
            raise ValueError(
                "redis+sentinel:// needs the service name as its path: "
                "redis+sentinel://host:26379[,host:26379...]/service_name[/db]"
            )
        db = _integer("db", path[1], low=0) if len(path) == 2 else 0
        options = _options(parts.query)
        known = (*_OUR_OPTIONS, *_TIMEOUT_OPTIONS, "sentinel_username", "sentinel_password")
        _refuse_unknown(options, known, "redis+sentinel")
        found = dict(options)
        replicas, wait_ms = _waiting(options)
        timeouts = _timeouts(found, replicas, wait_ms)
        sentinel_kwargs: dict[str, object] = {
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            # The Sentinels are asked in turn: that is the retry.
            "retry": Retry(NoBackoff(), 0),
        }
        if found.get("sentinel_username"):
            sentinel_kwargs["username"] = found["sentinel_username"]
        if found.get("sentinel_password"):
            sentinel_kwargs["password"] = found["sentinel_password"]
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
        return cls(
            sentinel,
            path[0],
            db=db,
            prefix=found.get("prefix", DEFAULT_PREFIX),
            min_replicas_acked=replicas,
            wait_timeout_ms=wait_ms,
            username=username,
            password=password,
            retry=_retry(),
            **timeouts,
        )

    def check(self) -> None:
        """Unavailable unless the Sentinels name a master, it answers as a master, and
        it takes a write (:meth:`RedisStore.check`)."""
        try:
            role = self.client.execute_command("ROLE")
        except _DRIVER_ERRORS as exc:
            raise StorageUnavailable(f"redis sentinel {self.service_name!r}: {exc}") from exc
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            # A demoted master: make the next command ask the Sentinels again.
            self.client.connection_pool.disconnect()
            raise StorageUnavailable(
                f"redis sentinel {self.service_name!r}: the server named as master is a {name}"
            )
        super().check()

    def close(self) -> None:
        super().close()
        self.sentinel.close()


# --- Cluster ------------------------------------------------------------------------


class RedisClusterStore(RedisStore):
    """``redis+cluster://``: a Redis Cluster, through redis-py's RedisCluster.

    RedisCluster connects as it is built, so it is built on first use (a store
    must not connect in ``from_url``, before gunicorn forks), and again after
    :meth:`close`.
    """

    def __init__(
        self,
        factory: Callable[[], RedisCluster],
        *,
        prefix: str = DEFAULT_PREFIX,
        min_replicas_acked: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        # Not RedisStore.__init__: there is no client until the first command.
        self.prefix = prefix
        self._owns_client = True
        self._set_waiting(min_replicas_acked, wait_timeout_ms)
        self._factory = factory
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._script_on: set[str] = set()  # nodes known to hold the script

    @classmethod
    def from_url(cls, url: str) -> RedisClusterStore:
        parts = urlsplit(url)
        if parts.scheme != "redis+cluster":
            raise ValueError(f"not a redis+cluster:// URL: {parts.scheme}://...")
        username, password, hosts = _netloc(parts.netloc, default_port=6379)
        if parts.path not in ("", "/"):
            raise ValueError(
                "redis+cluster:// takes no path (a cluster has one database): "
                "redis+cluster://host:6379[,host:6379...]"
            )
        options = _options(parts.query)
        _refuse_unknown(options, (*_OUR_OPTIONS, *_TIMEOUT_OPTIONS), "redis+cluster")
        found = dict(options)
        replicas, wait_ms = _waiting(options)
        kwargs: dict[str, object] = dict(_timeouts(found, replicas, wait_ms))
        if username is not None:
            kwargs["username"] = username
        if password is not None:
            kwargs["password"] = password

        def factory() -> RedisCluster:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                retry=_retry(),
                # The servers decide whether a partly covered cluster serves
                # (cluster-require-full-coverage); check() reports its state.
                require_full_coverage=False,
                **kwargs,
            )

        return cls(
            factory,
            prefix=found.get("prefix", DEFAULT_PREFIX),
            min_replicas_acked=replicas,
            wait_timeout_ms=wait_ms,
        )

    @property
    def client(self) -> RedisCluster:  # type: ignore[override]
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        built = self._factory()
                    except _DRIVER_ERRORS as exc:
                        raise StorageUnavailable(f"redis cluster: {exc}") from exc
                    self._set_script = built.register_script(_SET_SCRIPT)
                    self._get_script = built.register_script(_GET_SCRIPT)
                    self._script_on = set()
                    self._client = built
                client = self._client
        return client

    def _write(self, keys: list[str], args: list[object]) -> list:
        if self.min_replicas_acked:
            return self._on_nodes([(keys, args)])[0]
        client = self.client
        deadline = time.monotonic() + CLUSTER_RETRY_SECONDS
        for _ in range(_CLUSTER_ATTEMPTS):
            try:
                # redis-py follows MOVED and ASK, retries TRYAGAIN for ~0.4 s (then
                # "TTL exhausted", a ClusterError), and CLUSTERDOWN once itself.
                return self._set_script(keys, args, client=client)
            except (TryAgainError, ClusterError) as exc:
                if isinstance(exc, ClusterDownError) or time.monotonic() + 0.05 > deadline:
                    raise
                time.sleep(0.05)
        raise StorageUnavailable("redis cluster: a slot stayed in migration")

    def _on_nodes(self, calls: Sequence[_Call]) -> list:
        """Run the write script for each call on the node owning its slot, in one
        pipeline per node (ending with WAIT when replicas must acknowledge).

        A call redirected (MOVED, ASK), refused during a migration (TRYAGAIN) or
        missing the script is sent again, within :data:`CLUSTER_RETRY_SECONDS`.
        """
        client = self.client
        sha = self._set_script.sha
        replies: list = [None] * len(calls)
        pending = list(range(len(calls)))
        asking: dict[int, ClusterNode] = {}
        fewest_acks: int | None = None  # over the nodes written to
        deadline = time.monotonic() + CLUSTER_RETRY_SECONDS
        for _ in range(_CLUSTER_ATTEMPTS):
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in pending:
                node = asking.get(i) or client.get_node_from_key(calls[i][0][0])
                groups.setdefault(node.name, (node, []))[1].append(i)
            again, pause = [], False
            for node, indexes in groups.values():
                node_client = client.get_redis_connection(node)
                if node.name not in self._script_on:  # else a first batch is all NOSCRIPT
                    node_client.script_load(_SET_SCRIPT)
                    self._script_on.add(node.name)
                pipe = node_client.pipeline(transaction=False)
                for i in indexes:
                    keys, args = calls[i]
                    if i in asking:
                        pipe.execute_command("ASKING")
                    pipe.evalsha(sha, len(keys), *keys, *args)
                if self.min_replicas_acked:
                    self._queue_wait(pipe)
                try:
                    out = pipe.execute(raise_on_error=False)
                except (redis.ConnectionError, redis.TimeoutError):
                    _refresh(client)
                    raise
                acked = out.pop() if self.min_replicas_acked else None
                if isinstance(acked, Exception):
                    raise acked
                results = iter(out)
                for i in indexes:
                    if asking.pop(i, None) is not None:
                        next(results)  # ASKING's OK
                    reply = next(results)
                    if isinstance(reply, MovedError):
                        client.nodes_manager.move_slot(reply)
                    elif isinstance(reply, AskError):
                        target = client.get_node(host=reply.host, port=reply.port)
                        if target is None:
                            _refresh(client)
                        else:
                            asking[i] = target
                    elif isinstance(reply, NoScriptError):  # a restarted or new node
                        node_client.script_load(_SET_SCRIPT)
                    elif isinstance(reply, TryAgainError):  # a slot halfway through a migration
                        pause = True
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        replies[i] = reply
                        if acked is not None and reply[0] != -1:
                            fewest_acks = min(
                                acked, fewest_acks if fewest_acks is not None else acked
                            )
                        continue
                    again.append(i)
            if not again:
                # Every node has been written to before any shortfall is reported,
                # so a retried import has less left to do.
                if fewest_acks is not None:
                    self._check_acked(fewest_acks)
                return replies
            pending = again
            if time.monotonic() > deadline:
                break
            if pause:
                time.sleep(0.05)
        raise StorageUnavailable(
            f"redis cluster: {len(pending)} write(s) still redirected or refused "
            f"after {CLUSTER_RETRY_SECONDS} s (a slot in migration?)"
        )

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        # One script call per event: a script reaches one slot.
        touch = self.min_replicas_acked > 0
        added = 0
        try:
            self._refuse_if_evicting()
            for batch in batched(rows, _BATCH):
                calls = []
                for row in batch:
                    key = self.key(row[0])
                    calls.append(([key, key + ":h"], _args(row, touch=touch)))
                added += sum(reply[2] for reply in self._on_nodes(calls))
        except _DRIVER_ERRORS as exc:
            raise _wrap(exc) from exc
        return added

    # A script reaches one slot: a pipeline instead, which redis-py splits by node.
    def _ranges(self, keys: list[bytes], low: object) -> Iterator[Iterable[tuple[bytes, Any]]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zrangebyscore(key, low, "+inf", withscores=True)
        return iter(pipe.execute())

    def _count(self, keys: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        return sum(pipe.execute())

    def _policies(self) -> list[tuple[str, str | None]]:
        """Every master's that answers: one that does not fails its own members'
        writes (and check()), not the other masters'."""
        client = self.client
        found = []
        for node in client.get_primaries():
            try:
                found.append((f"master {node.name}", _policy_of(client.get_redis_connection(node))))
            except (redis.ConnectionError, redis.TimeoutError):
                continue
        return found

    def _check_keys(self, client: RedisCluster, primaries: list[ClusterNode]) -> list[str]:
        """One check() key on each master (as far as :data:`_CHECK_TAGS` tags reach)."""
        wanted = {node.name for node in primaries}
        found: dict[str, str] = {}
        for n in range(_CHECK_TAGS):
            key = self._check_key(f"-{n}")
            found.setdefault(client.get_node_from_key(key).name, key)
            if wanted <= found.keys():
                break
        return [key for name, key in found.items() if name in wanted]

    def check(self) -> None:
        """Unavailable unless every master answers, says ``cluster_state:ok``, keeps
        keys without a TTL and takes a write."""
        client = self.client
        try:
            primaries = client.get_primaries()
            if not primaries:
                raise StorageUnavailable("redis cluster: no master known")
            for node in primaries:
                info = client.get_redis_connection(node).execute_command("CLUSTER INFO")
                if _cluster_state(info) != "ok":
                    _refresh(client)
                    raise StorageUnavailable(f"redis cluster: {node.name} says the cluster is down")
            self._check_policy()
            for key in self._check_keys(client, primaries):
                client.set(key, 1, ex=CHECK_KEY_SECONDS)
        except _DRIVER_ERRORS as exc:
            _refresh(client)
            raise StorageUnavailable(f"redis cluster: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _overlapped(items: Iterator[T], run: Callable[[T], R]) -> Iterator[R]:
    """``run(item)`` for each item in turn, in a second thread, while the caller's
    thread makes the next item (the client builds a pipeline while Redis runs the
    previous one; waiting on a socket releases the GIL). One runs at a time, in order.
    """
    first = next(items, None)
    if first is None:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="optin-import") as runner:
        running = runner.submit(run, first)
        for item in items:
            yield running.result()
            running = runner.submit(run, item)
        yield running.result()


def _cluster_state(info: object) -> str | None:
    """``cluster_state`` from CLUSTER INFO, parsed by redis-py (a dict) or not (text)."""
    if isinstance(info, dict):
        state = info.get("cluster_state", info.get(b"cluster_state"))
        return state.decode() if isinstance(state, bytes) else state
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "cluster_state":
            return value
    return None


def _refresh(client: RedisCluster) -> None:
    """Ask the cluster for its slots again (best effort: the caller reports the error)."""
    try:
        client.nodes_manager.initialize()
    except Exception:  # nothing reachable: the next command says so
        pass


# --- URL parsing --------------------------------------------------------------------


def _netloc(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[user:password@]host[:port][,host[:port]...]`` -> (user, password, addresses)."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    addresses = []
    for part in hostlist.split(","):
        part = part.strip()
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad address {part!r} in the storage URL")
            port = rest[1:]
        else:
            host, _, port = part.partition(":")
        if not host:
            raise ValueError(f"empty host in the storage URL's host list {hostlist!r}")
        number = _integer("port", port, low=1, high=65535) if port else default_port
        addresses.append((unquote(host), number))
    return username, password, addresses


def _options(query: str) -> list[tuple[str, str]]:
    """A URL's query options; one given twice is refused (which should win is a guess)."""
    options = parse_qsl(query, keep_blank_values=True)
    names = [name for name, _ in options]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"option(s) given twice in the storage URL: {', '.join(repeated)}")
    return options


def _refuse_unknown(options: list[tuple[str, str]], known: Sequence[str], scheme: str) -> None:
    unknown = sorted({k for k, _ in options} - set(known))
    if unknown:
        raise ValueError(
            f"unknown {scheme}:// option(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def _refuse_unknown_driver_options(pool: redis.ConnectionPool, scheme: str) -> None:
    """Build one connection (without connecting) as the pool will: an option redis-py
    does not know fails here, at start-up, instead of on every request."""
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise ValueError(f"a {scheme}:// option is unknown: {exc}") from None


def _integer(name: str, raw: str, low: int, high: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high or 'any'}, not {value}")
    return value


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value


def _waiting(options: list[tuple[str, str]]) -> tuple[int, int]:
    """(min_replicas_acked, wait_timeout_ms) from the URL, else the environment, else 0."""
    found = dict(options)
    raw = found.get("min_replicas_acked")
    source = "min_replicas_acked"
    if raw is None:
        raw, source = os.environ.get(MIN_REPLICAS_ENV, "").strip() or "0", MIN_REPLICAS_ENV
    replicas = _integer(source, raw, low=0)
    wait_ms = _integer(
        "wait_timeout_ms", found.get("wait_timeout_ms", str(DEFAULT_WAIT_TIMEOUT_MS)), low=1
    )
    return replicas, wait_ms


def _socket_timeout(base: float, replicas: int, wait_ms: int) -> float:
    """A read must outlast the WAIT it may be waiting for."""
    return base + wait_ms / 1000 if replicas else base


def _timeouts(found: dict[str, str], replicas: int, wait_ms: int) -> dict[str, float]:
    return {
        "socket_timeout": (
            _seconds("socket_timeout", found["socket_timeout"])
            if "socket_timeout" in found
            else _socket_timeout(SOCKET_TIMEOUT, replicas, wait_ms)
        ),
        "socket_connect_timeout": (
            _seconds("socket_connect_timeout", found["socket_connect_timeout"])
            if "socket_connect_timeout" in found
            else CONNECT_TIMEOUT
        ),
    }


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)


# --- values -------------------------------------------------------------------------


def _event_args(row: EventRow) -> list[object]:
    """An event's ARGV for the write scripts: µs, history member, state value,
    1 if declined, request id."""
    _, us, request_id, status, source, client = row
    if not -_EXACT <= us <= _EXACT:  # rows skip OptInRecord's own check
        raise StorageError(f"redis: a time of {us} µs since the epoch cannot be scored exactly")
    # The history member is "<request id> <status> <source>": a source that is empty
    # or holds a space or newline, or a request id holding a newline, would be read
    # back as another event (the API and import never make one; a caller may).
    if not source or " " in source or "\n" in source or "\n" in request_id:
        raise StorageError(
            f"redis: cannot store source {source!r} with request id {request_id!r}: "
            "a source must be one word, and neither may hold a newline"
        )
    # The caller (client) follows a newline, which no other part can hold (the
    # client's own newlines and backslashes are escaped); an event without one
    # is stored exactly as before clients were recorded.
    caller = f"\n{_escape_client(client)}" if client else ""
    declined = 1 if status == "declined" else 0
    return [us, f"{request_id} {status} {source}{caller}", f"{us}{declined}", declined, request_id]


def _args(row: EventRow, *, touch: bool = False) -> list[object]:
    """The set script's ARGV: the event's, the fingerprint, the key's TTL[, touch]."""
    args = _event_args(row)
    args += (f"{row[3]}|{row[4]}", _KEY_TTL)  # OptInRecord.fingerprint
    if touch:
        args.append(1)
    return args


def _current(correlation_id: str, state: bytes | None, member: bytes | None) -> OptInRecord:
    """The current record from a state value (``<µs><0|1>``) and its event's history member."""
    if state is None or member is None:
        what = "a state" if state is None else f"an event for its state {state!r}"
        raise StorageError(f"redis: member {correlation_id!r} has no {what}")
    return _event(correlation_id, member, int(state[:-1]))


def _event(correlation_id: str, member: bytes, us: int) -> OptInRecord:
    return OptInRecord.from_row(_event_row(correlation_id, member, us))


def _event_row(correlation_id: str, member: bytes, score: bytes | float) -> EventRow:
    # "<request id> <status> <source>[\n<client>[\n<µs>]]": the µs only when the
    # same words were already stored at another time.
    text, _, rest = member.decode().partition("\n")
    client = _unescape_client(rest.split("\n", 1)[0]) if rest else ""
    request_id, status, source = text.rsplit(" ", 2)
    try:
        us = int(score)
    except ValueError:  # a score Redis wrote in exponent form
        us = int(float(score))
    return (correlation_id, us, request_id, status, source, client)


_CLIENT_UNESCAPES = re.compile(r"\\([\\n])")


def _escape_client(client: str) -> str:
    return client.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape_client(escaped: str) -> str:
    if "\\" not in escaped:
        return escaped
    return _CLIENT_UNESCAPES.sub(lambda m: "\n" if m[1] == "n" else "\\", escaped)


# What SCAN's MATCH reads as a pattern rather than a letter.
_GLOB_CHARS = re.compile(r"[\\*?\[\]]")
_ESCAPES = {"%": "%25", "}": "%7D"}
_UNESCAPES = re.compile("%(25|7D)")


def _escape(correlation_id: str) -> str:
    if "%" not in correlation_id and "}" not in correlation_id:
        return correlation_id
    return "".join(_ESCAPES.get(c, c) for c in correlation_id)


def _unescape(escaped: str) -> str:
    if "%" not in escaped:
        return escaped
    return _UNESCAPES.sub(lambda m: "%" if m[1] == "25" else "}", escaped)


def _wrap(exc: Exception) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    transient = isinstance(exc, _TRANSIENT) or (
        isinstance(exc, redis.ResponseError) and _REFUSED_FOR_NOW.search(str(exc)) is not None
    )
    kind = StorageUnavailable if transient else StorageError
    return kind(f"redis: {exc}")
