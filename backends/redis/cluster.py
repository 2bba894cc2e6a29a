"""``RedisClusterStore``: a Redis Cluster, through redis-py's RedisCluster.

``redis+cluster://[user:password@]host:port[,host:port...]``: reached through any
of the listed nodes. A script reaches one slot, so members are grouped: member
``m`` is in group ``crc32(m) % 64`` (:data:`GROUPS`; fixed for a store), and all
of its keys, and its group's feed stream, carry the group's hash tag:

- ``<prefix>{g<k>}{<escaped id>}``, ``...:h``, ``...:i:<key>``: the member's keys
  as in :mod:`.store` (Redis hashes the first tag only; the escaped id in the
  second pair of braces keeps members apart);
- ``<prefix>{g<k>}feed`` and ``<prefix>{g<k>}feed:pruned``: the group's feed.

So a write, its change included, is one script on one slot. The reader merges
the 64 streams by id (:mod:`.feed`): per member, changes are in commit order;
across members, in the order of the masters' clocks (to the µs; equal ids in
group order), each exactly once.

A write that meets a slot being migrated (``TRYAGAIN``) is retried briefly here
before answering "unavailable". Every master's eviction policy counts, and
``check()`` writes a key of its own on every master.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    TryAgainError,
)

from optin_service.feed import sorted_for_import
from optin_service.storage import EventRow, StorageUnavailable, batched

from . import codec, scripts
from . import url as parse
from .policy import policy_of
from .store import CHECK_KEY_SECONDS, RedisStore
from .url import DEFAULT_PREFIX, DEFAULT_WAIT_TIMEOUT_MS

#: How many groups (feed streams, hash tags) a Cluster store's members are in.
GROUPS = 64
#: A history key after the prefix: group, escaped id.
_HISTORY_KEY = re.compile(rb"\{g[0-9]+\}\{([^}]*)\}:h")

#: How long a Cluster store keeps retrying a write that meets a slot in migration.
CLUSTER_RETRY_SECONDS = 2.0
_CLUSTER_ATTEMPTS = 40
#: The default ``import_batch``: events per round of pipelines, one per master
#: (one script call per event: a script reaches one slot).
DEFAULT_IMPORT_BATCH = 1000
#: Tags tried to find a check() key on every master. A master owning about a
#: thousandth of the slots or less may get none (its policy is still read).
_CHECK_TAGS = 8192

#: One write: the set script's KEYS and ARGV.
_Call = tuple[list[str], list[object]]


class RedisClusterStore(RedisStore):
    """``redis+cluster://``: a Redis Cluster, through redis-py's RedisCluster.

    RedisCluster connects as it is built, so it is built on first use (a store
    must not connect in ``from_url``, before gunicorn forks), and again after
    :meth:`close`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis+cluster",)
    groups: ClassVar[int] = GROUPS
    _one_server: ClassVar[bool] = False
    _history_pattern = "{g*}{*}:h"

    def __init__(
        self,
        factory: Callable[[], RedisCluster],
        *,
        prefix: str = DEFAULT_PREFIX,
        min_replicas_acked: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        import_batch: int = DEFAULT_IMPORT_BATCH,
    ) -> None:
        # Not RedisStore.__init__: there is no client until the first command.
        self.prefix = prefix
        self._owns_client = True
        self._set_options(min_replicas_acked, wait_timeout_ms, import_batch)
        self._factory = factory
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._script_on: set[tuple[str, str]] = set()  # (node, sha) known to be loaded

    @classmethod
    def from_url(
        cls, url: str, *, min_replicas_acked: int | str | None = None
    ) -> RedisClusterStore:
        parts = urlsplit(url)
        if parts.scheme != "redis+cluster":
            raise ValueError(f"not a redis+cluster:// URL: {parts.scheme}://...")
        username, password, hosts = parse.netloc(parts.netloc, default_port=6379)
        if parts.path not in ("", "/"):
            raise ValueError(
                "redis+cluster:// takes no path (a cluster has one database): "
                "redis+cluster://host:6379[,host:6379...]"
            )
        options = parse.query_options(parts.query)
        parse.refuse_unknown(options, (*parse.OUR_OPTIONS, *parse.TIMEOUT_OPTIONS), "redis+cluster")
        ours = parse.store_options(options, min_replicas_acked)
        kwargs: dict[str, object] = dict(
            parse.timeouts(options, ours["min_replicas_acked"], ours["wait_timeout_ms"])
        )
        if username is not None:
            kwargs["username"] = username
        if password is not None:
            kwargs["password"] = password

        def factory() -> RedisCluster:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                retry=parse.retry(),
                # The servers decide whether a partly covered cluster serves
                # (cluster-require-full-coverage); check() reports its state.
                require_full_coverage=False,
                **kwargs,
            )

        return cls(factory, **ours)

    def _group_of(self, correlation_id: str) -> int:
        return zlib.crc32(correlation_id.encode()) % GROUPS

    def key(self, correlation_id: str) -> str:
        """The key holding a member's current state, tagged by its group."""
        group = self._group_of(correlation_id)
        return f"{self.prefix}{{g{group}}}{{{codec.escape(correlation_id)}}}"

    def _feed_keys(self, group: int) -> list[str]:
        feed = f"{self.prefix}{{g{group}}}feed"
        return [feed, feed + ":pruned"]

    def _feed_for(self, correlation_id: str) -> list[str]:
        return self._feed_keys(self._group_of(correlation_id))

    def _escaped_id(self, history_key: bytes) -> bytes | None:
        match = _HISTORY_KEY.fullmatch(history_key, len(self.prefix.encode()))
        return None if match is None else match[1]

    @property
    def client(self) -> RedisCluster:  # type: ignore[override]
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    # No node to ask is "unavailable", whatever the error says.
                    try:
                        built = self._factory()
                    except self.driver_errors as exc:
                        raise StorageUnavailable(f"redis cluster: {exc}") from exc
                    self._set_script = built.register_script(scripts.SET)
                    self._get_script = built.register_script(scripts.GET)
                    self._script_on = set()
                    self._client = built
                client = self._client
        return client

    def _write(self, keys: list[str], args: list[object]) -> list:
        if self.min_replicas_acked:
            return self._on_nodes(scripts.SET, [(keys, args)])[0]
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

    def _run_calls(self, script: str, calls: Sequence[_Call]) -> list:
        return self._on_nodes(script, calls)

    def _on_nodes(self, script: str, calls: Sequence[_Call]) -> list:
        """Run ``script`` for each call on the node owning its slot, in one pipeline
        per node, in order (ending with WAIT when replicas must acknowledge).

        A call redirected (MOVED, ASK), refused during a migration (TRYAGAIN) or
        missing the script is sent again, within :data:`CLUSTER_RETRY_SECONDS`. A
        slot's keys only ever leave a node during a migration, so once a call of a
        slot is redirected, the later calls of that slot on that node are too: the
        calls of one member still run in the order given.
        """
        client = self.client
        sha = client.register_script(script).sha
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
                if (node.name, sha) not in self._script_on:  # else a batch is all NOSCRIPT
                    node_client.script_load(script)
                    self._script_on.add((node.name, sha))
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
                        node_client.script_load(script)
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
        """``import_batch`` events at a time, one script call each (a script reaches
        one slot), in one pipeline per master, in import order (each member's oldest
        first)."""
        touch = self.min_replicas_acked > 0
        added = 0
        self._refuse_if_evicting()
        for batch in batched(sorted_for_import(rows), self.import_batch):
            calls = []
            for row in batch:
                key = self.key(row[0])
                keys = [key, key + ":h", *self._feed_for(row[0])]
                calls.append((keys, codec.set_args(row, touch=touch)))
            added += sum(reply[2] for reply in self._on_nodes(scripts.SET, calls))
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
                found.append((f"master {node.name}", policy_of(client.get_redis_connection(node))))
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
        except self.driver_errors as exc:  # any failure, transient or not, is "not ready"
            _refresh(client)
            raise StorageUnavailable(f"redis cluster: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


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
