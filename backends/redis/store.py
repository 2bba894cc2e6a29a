"""``RedisStore``: opt-in state on one Redis server (``redis://``, ``rediss://``,
``unix://``), and the base of the Sentinel and Cluster stores.

Keys per member, all sharing the hash tag ``{<correlation_id>}`` (on a Cluster,
see :mod:`.cluster`):

- ``<prefix>{<id>}``: the current state, ``<µs since epoch><1 if declined else 0>``
  then ``:<version>`` from the member's second change on (:mod:`.codec`): digits
  only for most members, so Redis keeps it as an integer inside the key's object.
  The rest of the current event (request id, source, client)
  is read from the history: it is the event at that time and status with the
  greatest request id;
- ``<prefix>{<id>}:h``: the history, a sorted set scored by µs (members as
  :mod:`backends.redis.codec` writes them; equal times sort by request id);
- ``<prefix>{<id>}:i:<Idempotency-Key>``: the fingerprint of the first request
  with that key, expiring after 24 hours.

The change feed (``<prefix>feed``...) and the deliverer's state: :mod:`.feed`.

Before writing, the store makes sure no server may evict a member's keys
(:mod:`.policy`).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode, urlsplit

import redis
from redis.exceptions import NoScriptError

from optin_service.feed import sorted_for_import
from optin_service.storage import (
    EventRow,
    IdempotencyKeyReused,
    OptInRecord,
    StorageError,
    StorageUnavailable,
    batched,
)

from . import codec, errors, scripts
from . import policy as policy_module
from . import url as parse
from .feed import Call, RedisFeed
from .policy import policy_of
from .url import DEFAULT_PREFIX, DEFAULT_WAIT_TIMEOUT_MS

#: How long a store trusts a safe eviction policy it read before reading it again.
POLICY_RECHECK_SECONDS = 1.0
#: How long check()'s own key lives: it proves a write, then goes.
CHECK_KEY_SECONDS = 10
#: Keys per SCAN step, and history keys per ranges or count call.
SCAN_PAGE = 1000
#: Events per call of the import script, at most: about a millisecond of Redis's time.
SCRIPT_EVENTS = 100
#: The default ``import_batch``: events per import pipeline.
DEFAULT_IMPORT_BATCH = 5000
# What SCAN's MATCH reads as a pattern rather than a letter.
_GLOB_CHARS = re.compile(r"[\\*?\[\]]")

T = TypeVar("T")
R = TypeVar("R")


class RedisStore(RedisFeed):
    """Opt-in state in Redis, through a redis-py client (ours, or one passed in).

    With ``min_replicas_acked`` N > 0, every write is followed by ``WAIT N
    wait_timeout_ms`` on the same connection, and fails with
    :class:`StorageUnavailable` unless N replicas acknowledged it.

    ``import_batch`` is how many events :meth:`import_rows` sends per pipeline
    (one round trip, ending with ``WAIT`` when replicas must acknowledge), in
    script calls of ``min(100, import_batch)`` events each.
    """

    #: The URL schemes :meth:`from_url` reads; a subclass declares its own.
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix")
    driver_errors = errors.DRIVER_ERRORS
    config_options: ClassVar[Mapping[str, str]] = {
        "OPTIN_REDIS_MIN_REPLICAS_ACKED": "min_replicas_acked"
    }

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
        import_batch: int = DEFAULT_IMPORT_BATCH,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._set_options(min_replicas_acked, wait_timeout_ms, import_batch)
        self._set_script = client.register_script(scripts.SET)
        self._get_script = client.register_script(scripts.GET)
        self._import_script = client.register_script(scripts.IMPORT)
        self._ranges_script = client.register_script(scripts.RANGES)
        self._count_script = client.register_script(scripts.COUNT)
        self._feed = self._feed_keys(0)

    def _set_options(
        self, min_replicas_acked: int, wait_timeout_ms: int, import_batch: int
    ) -> None:
        if min_replicas_acked < 0:
            raise ValueError(f"min_replicas_acked must be 0 or more, not {min_replicas_acked}")
        if wait_timeout_ms < 1:  # WAIT n 0 would block forever
            raise ValueError(f"wait_timeout_ms must be 1 or more, not {wait_timeout_ms}")
        if import_batch < 1:
            raise ValueError(f"import_batch must be 1 or more, not {import_batch}")
        self.min_replicas_acked = min_replicas_acked
        self.wait_timeout_ms = wait_timeout_ms
        self.import_batch = import_batch

    @classmethod
    def wrap_error(cls, exc: BaseException) -> StorageError:
        return errors.wrap(exc)

    @classmethod
    def from_url(cls, url: str, *, min_replicas_acked: int | str | None = None) -> RedisStore:
        """A store for a ``redis://``, ``rediss://`` or ``unix://`` URL (a
        ``redis+sentinel://`` or ``redis+cluster://`` one is read by its own class),
        without connecting. ``min_replicas_acked`` applies unless the URL gives its own."""
        parts = urlsplit(url)
        if parts.scheme not in cls.schemes:
            for topology in RedisStore.__subclasses__():
                if parts.scheme in vars(topology).get("schemes", ()):
                    return topology.from_url(url, min_replicas_acked=min_replicas_acked)
        if parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]+/?", parts.path):
            # redis-py would read "/tenant2" as database 0: another tenant's, maybe.
            raise ValueError(f"a {parts.scheme}:// URL's database is /<number>, not {parts.path}")
        options = parse.query_options(parts.query)
        ours = parse.store_options(options, min_replicas_acked)
        rest = urlencode([(k, v) for k, v in options if k not in parse.OUR_OPTIONS])
        # The URL as given with only our options taken out: urlunsplit() would turn
        # unix:///path into unix:/path, which redis-py refuses.
        client = redis.Redis.from_url(
            url.partition("?")[0] + (f"?{rest}" if rest else ""),
            socket_timeout=parse.socket_timeout(
                ours["min_replicas_acked"], ours["wait_timeout_ms"]
            ),
            socket_connect_timeout=parse.CONNECT_TIMEOUT,
            retry=parse.retry(),
        )
        parse.refuse_unknown_driver_options(client.connection_pool, parts.scheme)
        return cls(client, owns_client=True, **ours)

    def key(self, correlation_id: str) -> str:
        """The key holding a member's current state (hash-tagged by member).

        ``}`` and ``%`` in an id (never in one the API accepts) are escaped, so
        the hash tag is the whole id and no member's keys can be another's.
        """
        return f"{self.prefix}{{{codec.escape(correlation_id)}}}"

    def get(self, correlation_id: str) -> OptInRecord | None:
        key = self.key(correlation_id)
        client = self.client  # first: a Cluster store builds it, and its scripts, on first use
        found = self._get_script([key, key + ":h"], client=client)
        return None if found is None else codec.current(correlation_id, *found)

    def _check_key(self, tag: str = "") -> str:
        """check()'s key. An escaped id holds ``%`` only as ``%25`` or ``%7D``, so the
        hash tag ``{%check...}`` is no member's."""
        return f"{self.prefix}{{%check{tag}}}"

    def _policies(self) -> list[tuple[str, str | None]]:
        """(server, ``maxmemory_policy``) of each server the store writes to."""
        return [("the server", policy_of(self.client))]

    def _check_policy(self) -> None:
        """Raise :class:`StorageUnavailable` if a server may evict keys without a TTL."""
        unread = []
        for server, policy in self._policies():
            if policy is None:
                unread.append(server)
            else:
                policy_module.refuse_if_evicting(server, policy)
        if unread and not self._warned_unread_policy:
            self._warned_unread_policy = True
            policy_module.warn_unread(unread)

    def _refuse_if_evicting(self) -> None:
        """:meth:`_check_policy`, trusted for :data:`POLICY_RECHECK_SECONDS` once it passes
        (a refusal is not cached: writes resume as soon as the policy is fixed)."""
        now = time.monotonic()
        if now >= self._policy_ok_until:
            self._check_policy()
            self._policy_ok_until = now + POLICY_RECHECK_SECONDS

    def set(self, record: OptInRecord, *, idempotency_key: str | None = None) -> OptInRecord:
        key = self.key(record.correlation_id)
        keys = [key, key + ":h", *self._feed_for(record.correlation_id)]
        if idempotency_key is not None:
            keys.append(f"{key}:i:{idempotency_key}")
        self._refuse_if_evicting()
        reply = self._write(keys, codec.set_args(record.row, touch=self.min_replicas_acked > 0))
        if reply[0] == -1:
            raise IdempotencyKeyReused(idempotency_key)
        if reply[0] == 1 and reply[1] is not None and reply[3] is None:
            return record  # it is the current state now
        return codec.current(record.correlation_id, reply[1], reply[3])

    def _feed_for(self, correlation_id: str) -> list[str]:
        """The keys of the feed a member's changes go to: its stream and marker."""
        return self._feed

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
                self.client.script_load(scripts.SET)
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
        # Events at the cursor's own time but not before it in request-id
        # order are skipped, so a page may need more than one fetch.
        while len(found) < limit:
            want = limit - len(found) + 1
            page = self.client.zrevrangebyscore(
                key, top, "-inf", start=offset, num=want, withscores=True
            )
            for member, score in page:
                event = codec.event(correlation_id, member, int(score))
                if before is None or event.position < before:
                    found.append(event)
            if len(page) < want:
                break
            offset += len(page)
        return found[:limit]

    def import_rows(self, rows: Iterable[EventRow]) -> int:
        """``import_batch`` events per pipeline (ending with WAIT when replicas must
        acknowledge), ``min(100, import_batch)`` per script call; the next pipeline
        is built while Redis runs the previous one. Events go in import order (each
        member's oldest first), so their changes do too."""
        touch = self.min_replicas_acked > 0
        ordered = sorted_for_import(rows)
        pipelines = (
            self._import_pipeline(batch, touch) for batch in batched(ordered, self.import_batch)
        )
        self._refuse_if_evicting()
        return sum(_overlapped(pipelines, functools.partial(self._run_import, touch=touch)))

    def _import_pipeline(self, batch: list[EventRow], touch: bool) -> redis.client.Pipeline:
        pipe = self.client.pipeline(transaction=False)
        key = self.key
        per_call = min(SCRIPT_EVENTS, self.import_batch)
        for start in range(0, len(batch), per_call):
            keys: list[str] = list(self._feed)
            args: list[object] = [1 if touch else 0]
            for row in batch[start : start + per_call]:
                current = key(row[0])
                keys += (current, current + ":h")
                args += codec.event_args(row)
            self._import_script(keys, args, client=pipe)
        if touch:
            self._queue_wait(pipe)
        return pipe

    def _run_import(self, pipe: redis.client.Pipeline, touch: bool) -> int:
        replies = pipe.execute()
        if touch:
            self._check_acked(replies.pop())
        return sum(replies)

    #: SCAN's pattern for history keys, after the prefix.
    _history_pattern = "{*}:h"

    def _escaped_id(self, history_key: bytes) -> bytes | None:
        """The id part of ``<prefix>{<id>}:h``, cut after the prefix's bytes (not its
        letters: the prefix may not be ASCII); ``None`` for another prefix's key (ids
        are escaped: no ``}``; the prefixes "" and "{x}:" both match)."""
        escaped = history_key[len(self.prefix.encode()) + 1 : -3]
        return None if b"}" in escaped else escaped

    def _history_keys(self) -> Iterator[list[bytes]]:
        pattern = _GLOB_CHARS.sub(r"\\\g<0>", self.prefix) + self._history_pattern
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=SCAN_PAGE, _type="zset"):
            if self._escaped_id(key) is None:
                continue
            batch.append(key)
            if len(batch) == SCAN_PAGE:
                yield batch
                batch = []
        if batch:
            yield batch

    def rows(self, since: datetime | None = None) -> Iterator[EventRow]:
        low = "-inf" if since is None else OptInRecord("-", "accepted", since).updated_at_us
        for keys in self._history_keys():
            for key, pairs in zip(keys, self._ranges(keys, low), strict=True):
                cid = codec.unescape(self._escaped_id(key).decode())  # type: ignore[union-attr]
                for member, score in pairs:
                    yield codec.event_row(cid, member, score)

    def _ranges(self, keys: list[bytes], low: object) -> Iterator[Iterable[tuple[bytes, Any]]]:
        """For each history key, its (member, score) pairs at or after ``low``."""
        for flat in self._ranges_script(keys, [low]):
            yield zip(flat[::2], flat[1::2], strict=True)

    def _run_calls(self, script: str, calls: list[Call]) -> list:
        """``script`` once per call, in one pipeline, in order; the replies."""
        runner = self.client.register_script(script)
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            runner(keys, args, client=pipe)
        return pipe.execute()

    def count_events(self) -> int:
        return sum(self._count(keys) for keys in self._history_keys())

    def _count(self, keys: list[bytes]) -> int:
        """How many events the history keys hold, together."""
        return self._count_script(keys)

    def check(self) -> None:
        """Unavailable unless a write would succeed now: the eviction policy (read
        afresh) keeps keys, and a short-lived key of the store's own is written."""
        try:
            self._check_policy()
            self.client.set(self._check_key(), 1, ex=CHECK_KEY_SECONDS)
        except self.driver_errors as exc:  # any failure, transient or not, is "not ready"
            raise StorageUnavailable(f"redis: {exc}") from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


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
