"""``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``, ``redis+cluster://``: Redis.

- :mod:`.store`: :class:`RedisStore`, one server, and the key layout;
- :mod:`.sentinel`: :class:`RedisSentinelStore`, the master a set of Sentinels names;
- :mod:`.cluster`: :class:`RedisClusterStore`, a Redis Cluster;
- :mod:`.feed`: the change feed (streams of changes, cursors, retention,
  rebuild) and the webhook deliverer's state;
- :mod:`.url`: reading the URL and its options; :mod:`.codec`: events as Redis
  values; :mod:`.scripts`: the Lua scripts (``lua/*.lua``); :mod:`.errors`:
  which driver errors are transient; :mod:`.policy`: eviction policies.

Every write is one Lua script: the event, the current state, the idempotency
key and the change it makes (its entry in the feed) change together or not at
all (the current state is read and checked before anything is written). An
event is its member, time and request id: one already stored is skipped whole,
whatever its other fields say.

A dead or hung Redis must cost a request about a second, not a minute:
redis-py's own defaults are 5 s timeouts with up to 10 retries, and ``from_url``
applies no retry at all. These stores set short timeouts and one retry with a
small backoff (a retry is what reconnects after Redis restarts, so the service
recovers by itself). Every timeout can be overridden in the URL, for example
``redis://host:6379/0?socket_timeout=1&socket_connect_timeout=1``.

Query options of our own, on every scheme:

- ``prefix`` (default ``optin:``);
- ``min_replicas_acked`` (default: the ``min_replicas_acked`` keyword of
  ``from_url``, which the app fills from ``OPTIN_REDIS_MIN_REPLICAS_ACKED``,
  else 0): after each write, ``WAIT`` on the same connection until that many
  replicas have it, else the write is reported as unavailable (a 503: the event
  may still be on the master, and a retry with the same ``Idempotency-Key`` is safe);
- ``wait_timeout_ms`` (default 500): how long that ``WAIT`` may take;
- ``import_batch`` (default 5000; 1000 on a Cluster): events an import sends per
  pipeline (per master on a Cluster), ``min(100, import_batch)`` per script call.

On ``redis+sentinel`` and ``redis+cluster`` the only other options are
``socket_timeout`` and ``socket_connect_timeout`` (seconds).

Before writing, a store makes sure no server it writes to may evict a member's
keys (see :mod:`.store`); ``check()`` reads the eviction policy every time and
writes a short-lived key of its own on every master, so it fails whenever a
write would (read-only replica, ``NOREPLICAS``, ``OOM``, ``MISCONF``).
"""

from __future__ import annotations

from .cluster import CLUSTER_RETRY_SECONDS, RedisClusterStore
from .sentinel import MASTER_RECHECK_SECONDS, RedisSentinelStore
from .store import CHECK_KEY_SECONDS, POLICY_RECHECK_SECONDS, RedisStore
from .url import (
    CONNECT_TIMEOUT,
    DEFAULT_PREFIX,
    DEFAULT_WAIT_TIMEOUT_MS,
    SENTINEL_TIMEOUT,
    SOCKET_TIMEOUT,
)

__all__ = [
    "CHECK_KEY_SECONDS",
    "CLUSTER_RETRY_SECONDS",
    "CONNECT_TIMEOUT",
    "DEFAULT_PREFIX",
    "DEFAULT_WAIT_TIMEOUT_MS",
    "MASTER_RECHECK_SECONDS",
    "POLICY_RECHECK_SECONDS",
    "SENTINEL_TIMEOUT",
    "SOCKET_TIMEOUT",
    "RedisClusterStore",
    "RedisSentinelStore",
    "RedisStore",
]
