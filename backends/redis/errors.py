"""Which redis-py errors the Redis stores wrap, and which of them are transient.

:class:`~backends.redis.store.RedisStore` lists :data:`DRIVER_ERRORS` as its
``driver_errors``; the storage base class then raises each one, from any public
method, as :func:`wrap` says: :class:`StorageUnavailable` (a 503 with
Retry-After) when retrying later may succeed, else :class:`StorageError`.
"""

from __future__ import annotations

import re

import redis
from redis.cluster import RedisClusterException
from redis.exceptions import AskError, ClusterError, TryAgainError

from optin_service.storage import StorageError, StorageUnavailable

#: What redis-py raises: RedisClusterException is not a RedisError.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException)

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


def is_transient(exc: BaseException) -> bool:
    """Whether a retry later may succeed where ``exc`` failed."""
    return isinstance(exc, _TRANSIENT) or (
        isinstance(exc, redis.ResponseError) and _REFUSED_FOR_NOW.search(str(exc)) is not None
    )


def wrap(exc: BaseException) -> StorageError:
    """The storage error to raise for a driver error ``exc``."""
    kind = StorageUnavailable if is_transient(exc) else StorageError
    return kind(f"redis: {exc}")
