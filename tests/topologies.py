"""Real topologies on loopback for tests: Redis Sentinel (master, replica, three
Sentinels) and Cluster (three masters), from Debian's redis-server and redis-cli;
a PostgreSQL primary with a streaming standby, from Debian's postgresql.

Every process binds 127.0.0.1 only, on a free port, in its own directory under
the temp dir it is given; :meth:`stop` ends every process it started (by pid).
Every wait is bounded in time and in count, and fails with what it last saw.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import redis
from redis.cluster import key_slot

from tests.servers import LOOPBACK, PostgresServer, RedisProcess, child_pids, client, free_port
from tests.servers import binary as _binary

T = TypeVar("T")

SERVICE = "optin-test"


def wait_until(
    what: str, probe: Callable[[], T | None], timeout: float = 15.0, every: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy (errors count as "not yet")."""
    deadline = time.monotonic() + timeout
    last: object = "never probed"
    for _ in range(int(timeout / every) + 2):
        try:
            result = probe()
        except Exception as exc:  # a server not up yet, a refused connection...
            last = repr(exc)
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            break
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout}s (last: {last})")


def _data_node_args() -> list[str]:
    # AOF with fsync on every write: the same durability as tests.servers.RedisServer.
    # A replica's full sync starts at once (the default waits 5 s for more replicas
    # to share one transfer; docs/redis.md says what that means after a failover).
    return [
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


class SentinelTopology:
    """A master, one replica and three Sentinels (quorum 2), all on loopback.

    Failure detection is fast: a master is down after ``down_after_ms`` without
    an answer. Sentinel's internal clocks (INFO every 10 s, hello every 2 s)
    are shortened with ``SENTINEL DEBUG`` so that a demoted master is turned into
    a replica within a few seconds rather than about ten; docs/redis.md says what
    the defaults mean in production.
    """

    def __init__(
        self,
        workdir: Path,
        service: str = SERVICE,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 4000,
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        node_args = [*_data_node_args(), "--replica-serve-stale-data", "yes"]
        self.nodes = [RedisProcess(workdir / f"node-{i}", node_args) for i in range(2)]
        self.sentinels = []
        for i in range(3):
            conf = workdir / f"sentinel-{i}" / "sentinel.conf"
            self.sentinels.append(RedisProcess(conf.parent, [str(conf), "--sentinel"]))

    # --- life cycle ----------------------------------------------------------

    def start(self) -> SentinelTopology:
        try:
            master, replica = self.nodes
            master.start()
            replica.start("--replicaof", LOOPBACK, str(master.port))
            self.wait_replicated(master.port, timeout=15)
            for sentinel in self.sentinels:
                self._write_sentinel_conf(sentinel, master.port)
                sentinel.start()
                with sentinel.client() as c:
                    # INFO every second, hellos every half second: a demoted
                    # master is reconfigured within ~3 s instead of ~10 s.
                    c.execute_command("SENTINEL", "DEBUG", "info-period", 1000)
                    c.execute_command("SENTINEL", "DEBUG", "publish-period", 500)
            self.wait_stable(timeout=20)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes]:
            with contextlib.suppress(Exception):
                process.stop()

    def _write_sentinel_conf(self, sentinel: RedisProcess, master_port: int) -> None:
        sentinel.workdir.mkdir(parents=True, exist_ok=True)
        (sentinel.workdir / "sentinel.conf").write_text(
            "\n".join(
                [
                    f"sentinel monitor {self.service} {LOOPBACK} {master_port} 2",
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.service} 1",
                    "",
                ]
            )
        )

    # --- what the Sentinels say -------------------------------------------------

    def url(self, **options: object) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis+sentinel://{hosts}/{self.service}" + (f"?{query}" if query else "")

    def master_port(self) -> int:
        """The master's port according to a majority of the running Sentinels."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(redis.RedisError), sentinel.client() as c:
                found = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                if found:
                    port = int(found[1])
                    votes[port] = votes.get(port, 0) + 1
        agreed = [port for port, count in votes.items() if count >= 2]
        if not agreed:
            raise RuntimeError(f"the Sentinels do not agree on a master: {votes}")
        return agreed[0]

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def master(self) -> RedisProcess:
        return self.node(self.master_port())

    def replica(self) -> RedisProcess:
        port = self.master_port()
        return next(n for n in self.nodes if n.port != port)

    def wait_replicated(self, master_port: int, timeout: float = 15.0) -> None:
        """Until ``master_port`` is a master with every other data node a synced replica."""

        def probe() -> bool:
            with client(master_port) as c:
                info = c.info("replication")
            if info.get("role") != "master":
                return False
            others = {n.port for n in self.nodes if n.port != master_port}
            online = {
                int(v["port"])
                for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            }
            return others <= online

        wait_until(f"replicas of {master_port} online", probe, timeout=timeout)

    def wait_stable(self, timeout: float = 20.0) -> int:
        """Until every Sentinel sees the same master, its replica and the two other
        Sentinels, and the data nodes replicate from it. Returns the master's port."""

        def probe() -> int | None:
            ports = set()
            for sentinel in self.sentinels:
                with sentinel.client() as c:
                    state = c.sentinel_master(self.service)
                    replicas = c.sentinel_slaves(self.service)
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return None
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return None
                for entry in replicas:
                    if entry["is_sdown"] or entry.get("master-link-status") != "ok":
                        return None
                ports.add(int(state["port"]))
            if len(ports) != 1:
                return None
            port = ports.pop()
            self.wait_replicated(port, timeout=0.01)
            return port

        return wait_until("a stable Sentinel topology", probe, timeout=timeout, every=0.1)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica now, without agreement."""
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.service)

    def wait_for_new_master(self, old_port: int, timeout: float = 15.0) -> int:
        def probe() -> int | None:
            port = self.master_port()
            if port == old_port:
                return None
            with client(port) as c:
                return port if c.info("replication")["role"] == "master" else None

        return wait_until(f"a master other than {old_port}", probe, timeout=timeout, every=0.05)

    def logs(self) -> str:
        parts = []
        for process in [*self.nodes, *self.sentinels]:
            parts.append(f"--- {process.workdir.name} :{process.port} ---\n{process.log(2500)}")
        return "\n".join(parts)


class ClusterTopology:
    """A Redis Cluster of ``masters`` masters (each with ``replicas`` replicas) on loopback."""

    def __init__(
        self, workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        args = [
            *_data_node_args(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        # The cluster bus needs a port too: by default port + 10000, which may be
        # taken or above 65535 for a free port picked at random, so pick it as well.
        self.nodes = [
            RedisProcess(workdir / f"node-{i}", [*args, "--cluster-port", str(free_port())])
            for i in range(masters * (1 + replicas))
        ]

    def start(self) -> ClusterTopology:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{LOOPBACK}:{n.port}" for n in self.nodes]
            self.redis_cli(
                "--cluster", "create", *addresses,
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
                timeout=60,
            )  # fmt: skip
            self.wait_ok(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def redis_cli(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [_binary("redis-cli"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def url(self, **options: object) -> str:
        hosts = ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis+cluster://{hosts}" + (f"?{query}" if query else "")

    def running(self) -> Iterator[RedisProcess]:
        return (n for n in self.nodes if n.running)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` and all agree on the slots."""

        def probe() -> bool:
            views = set()
            for node in self.running():
                with node.client() as c:
                    if c.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                        return False
                    views.add(self._slot_view(c))
            return len(views) == 1

        wait_until("cluster_state:ok on every node", probe, timeout=timeout, every=0.1)

    @staticmethod
    def _slot_view(c: redis.Redis) -> tuple:
        """What one node believes: every master, its slots, and any slot in migration."""
        nodes = c.execute_command("CLUSTER NODES")
        return tuple(
            sorted(
                (
                    entry["node_id"],
                    tuple(tuple(r) for r in entry["slots"]),
                    tuple(map(str, entry["migrations"])),
                )
                for entry in nodes.values()
                if "master" in entry["flags"]
            )
        )

    def master_ids(self) -> dict[str, int]:
        """Node id -> port, for every master not known to have failed."""
        with next(self.running()).client() as c:
            nodes = c.execute_command("CLUSTER NODES")
        return {
            entry["node_id"]: int(address.split(":")[1].split("@")[0])
            for address, entry in nodes.items()
            if "master" in entry["flags"] and "fail" not in entry["flags"]
        }

    def slot_owner(self, slot: int) -> str:
        """The id of the master serving ``slot`` now."""
        with next(self.running()).client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return master[2]
        raise LookupError(f"slot {slot} is not served")

    def slots_of(self, node_id: str) -> list[int]:
        with next(self.running()).client() as c:
            ranges = c.execute_command("CLUSTER SLOTS")
        return [
            slot
            for start, end, master, *_ in ranges
            if master[2] == node_id
            for slot in range(int(start), int(end) + 1)
        ]

    def node_by_id(self, node_id: str) -> RedisProcess:
        return self.node_at(self.master_ids()[node_id])

    def node_at(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def reshard(self, source: str, target: str, slots: int, timeout: float = 120) -> float:
        """Move ``slots`` slots from ``source`` to ``target`` with ``redis-cli --cluster
        reshard``, while the cluster serves; returns the seconds it took."""
        started = time.monotonic()
        self.redis_cli(
            "--cluster", "reshard", f"{LOOPBACK}:{self.nodes[0].port}",
            "--cluster-from", source,
            "--cluster-to", target,
            "--cluster-slots", str(slots),
            "--cluster-yes",
            timeout=timeout,
        )  # fmt: skip
        return time.monotonic() - started


def slot_of(store_key: str) -> int:
    """The Cluster slot of a key (the hash tag's, when it has one)."""
    return key_slot(store_key.encode())


# --- PostgreSQL: a primary and a streaming standby -----------------------------------------

STANDBY = "standby1"  # the standby's cluster_name: its application_name on the primary


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class PostgresStandby(PostgresServer):
    """A streaming standby of ``primary``: ``pg_basebackup -R`` (the primary's data and
    settings, with ``primary_conninfo``), then started on a port of its own."""

    def __init__(self, primary: PostgresServer, name: str = STANDBY) -> None:
        super().__init__(settings={"cluster_name": name})
        self.primary = primary
        self.name = name

    def start(self) -> PostgresStandby:
        if not (self.data / "PG_VERSION").exists():
            self._run(
                self.bin / "pg_basebackup", "-D", self.data,
                "-h", LOOPBACK, "-p", self.primary.port, "-U", "postgres",
                "-R", "-X", "stream", "-c", "fast", "--no-sync",
            )  # fmt: skip
        super().start()
        return self

    def promote(self) -> None:
        """``pg_ctl promote -w``: returns once this server takes writes."""
        self._run(self.bin / "pg_ctl", "promote", "-D", self.data, "-w", "-t", "30")


class PostgresReplication:
    """A primary and one streaming standby on loopback, each in a temp dir of its own.

    ``synchronous``: ``"off"`` (asynchronous streaming), ``"primary"``
    (``synchronous_standby_names`` naming the standby, set on the primary once the
    standby is copied) or ``"both"`` (set before the copy, so the standby inherits
    it: promoted, it waits for a standby that does not exist).

    Faults are signals to every process of a server: the postmaster and its children
    (each child of a postmaster leads a process group of its own, so a signal to the
    postmaster's group reaches only the postmaster). :meth:`crash` is a host dying
    (SIGKILL to them all), :meth:`stall` a replication link stalled, :meth:`freeze_primary`
    a primary hung, :meth:`resume` the end of either.
    """

    def __init__(self, synchronous: str = "primary") -> None:
        if synchronous not in ("off", "primary", "both"):
            raise ValueError(f"synchronous={synchronous!r}")
        self.synchronous = synchronous
        self.primary = PostgresServer()
        self.standby = PostgresStandby(self.primary)
        self._stalled: list[int] = []

    def start(self) -> PostgresReplication:
        try:
            self.primary.start()
            if self.synchronous == "both":
                self.require_standby(self.primary)
            self.standby.start()
            if self.synchronous == "primary":
                self.require_standby(self.primary)
            wanted = "async" if self.synchronous == "off" else "sync"
            wait_until(
                f"{STANDBY} streaming ({wanted})",
                lambda: self.primary.execute(
                    "SELECT 1 FROM pg_stat_replication "
                    f"WHERE application_name = '{STANDBY}' AND state = 'streaming' "
                    f"AND sync_state = '{wanted}'"
                ),
                timeout=20,
                every=0.1,
            )
        except BaseException:
            self.cleanup()
            raise
        return self

    @staticmethod
    def require_standby(server: PostgresServer) -> None:
        """Commits on ``server`` wait for the standby (``synchronous_commit`` is on)."""
        server.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY}'")
        server.reload()

    def url(self, **options: str) -> str:
        """The service's URL: both hosts, the writable one wanted."""
        query = "&".join(
            f"{k}={v}" for k, v in {"target_session_attrs": "read-write", **options}.items()
        )
        hosts = f"{LOOPBACK}:{self.primary.port},{LOOPBACK}:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?{query}"

    @staticmethod
    def _freeze(server: PostgresServer) -> list[int]:
        """SIGSTOP the postmaster (so it starts no new child), then each of its children:
        every pid stopped, the postmaster first."""
        pid = server.pid
        assert pid is not None, f"{server.data} is not running"
        os.kill(pid, signal.SIGSTOP)
        children = child_pids(pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
        return [pid, *children]

    def stall(self) -> None:
        """Stall replication until :meth:`resume`: freeze the primary's WAL sender (what
        the primary writes from now on stays there, as behind a network partition) and
        every process of the standby (it flushes and acknowledges nothing). WAL sent
        before is in the standby's socket buffer: it gets it once thawed."""
        (walsender,) = self.primary.execute(
            f"SELECT pid FROM pg_stat_replication WHERE application_name = '{STANDBY}'"
        )[0]
        os.kill(walsender, signal.SIGSTOP)
        self._stalled.append(walsender)
        self._stalled.extend(self._freeze(self.standby))

    def freeze_primary(self) -> None:
        """Freeze every process of the primary (a host hung, its sockets open: the
        service's connections to it neither answer nor fail) until :meth:`resume`."""
        self._stalled.extend(self._freeze(self.primary))

    def resume(self) -> None:
        for pid in self._stalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stalled.clear()

    def crash(self) -> None:
        """SIGKILL every process of the primary (a host dying), and wait until they are
        gone."""
        pids = self._freeze(self.primary)
        for pid in reversed(pids):  # the children, then the postmaster
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        wait_until("the primary's processes gone", lambda: not any(map(_alive, pids)), every=0.02)

    def cleanup(self) -> None:
        self.resume()
        for server in (self.standby, self.primary):
            server.cleanup()

    def logs(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- {name} :{server.port} ---\n{server.log(chars)}"
            for name, server in (("primary", self.primary), ("standby", self.standby))
        )
