"""``RedisSentinelStore``: the master of a Sentinel-monitored service.

``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``:
the master of ``service_name`` as the Sentinels name it, found again after a
failover (on every new connection, and at least once a second even on warm
ones, so writes stop going to a demoted master within about a second).
``user:password`` are the data nodes'; the ``sentinel_username`` and
``sentinel_password`` query options are the Sentinels' own, if they have any.
"""

from __future__ import annotations

import time
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from optin_service.storage import StorageUnavailable

from . import url as parse
from .store import DEFAULT_IMPORT_BATCH, RedisStore
from .url import DEFAULT_PREFIX, DEFAULT_WAIT_TIMEOUT_MS

#: How often a Sentinel store asks the Sentinels who the master is, at most.
MASTER_RECHECK_SECONDS = 1.0


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

    schemes: ClassVar[tuple[str, ...]] = ("redis+sentinel",)

    def __init__(
        self,
        sentinel: Sentinel,
        service_name: str,
        *,
        db: int = 0,
        prefix: str = DEFAULT_PREFIX,
        min_replicas_acked: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        import_batch: int = DEFAULT_IMPORT_BATCH,
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
            import_batch=import_batch,
        )
        self.sentinel = sentinel
        self.service_name = service_name

    @classmethod
    def from_url(
        cls, url: str, *, min_replicas_acked: int | str | None = None
    ) -> RedisSentinelStore:
        parts = urlsplit(url)
        if parts.scheme != "redis+sentinel":
            raise ValueError(f"not a redis+sentinel:// URL: {parts.scheme}://...")
        username, password, hosts = parse.netloc(parts.netloc, default_port=26379)
        path = [unquote(p) for p in parts.path.split("/")[1:]]
        if len(path) == 2 and path[1] == "":
            path.pop()
        if not 1 <= len(path) <= 2 or not path[0]:
            raise ValueError(
                "redis+sentinel:// needs the service name as its path: "
                "redis+sentinel://host:26379[,host:26379...]/service_name[/db]"
            )
        db = parse.integer("db", path[1], low=0) if len(path) == 2 else 0
        options = parse.query_options(parts.query)
        known = (
            *parse.OUR_OPTIONS,
            *parse.TIMEOUT_OPTIONS,
            "sentinel_username",
            "sentinel_password",
        )
        parse.refuse_unknown(options, known, "redis+sentinel")
        found = dict(options)
        ours = parse.store_options(options, min_replicas_acked)
        sentinel_kwargs: dict[str, object] = {
            "socket_timeout": parse.SENTINEL_TIMEOUT,
            "socket_connect_timeout": parse.SENTINEL_TIMEOUT,
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
            username=username,
            password=password,
            retry=parse.retry(),
            **parse.timeouts(options, ours["min_replicas_acked"], ours["wait_timeout_ms"]),
            **ours,
        )

    def check(self) -> None:
        """Unavailable unless the Sentinels name a master, it answers as a master, and
        it takes a write (:meth:`RedisStore.check`)."""
        try:
            role = self.client.execute_command("ROLE")
        except self.driver_errors as exc:  # any failure, transient or not, is "not ready"
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
