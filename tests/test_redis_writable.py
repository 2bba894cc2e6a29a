"""A Redis store writes only where a write will last, and ``check()`` proves it can write.

Under an ``allkeys-*`` eviction policy Redis may drop a member's state or history (keys
without a TTL) to make room: the store refuses to write there, and reads the policy
again at least once a second, since ``CONFIG SET`` changes it at runtime. ``check()``
(``/readyz``) fails whenever a write would: a read-only replica, ``NOREPLICAS``,
``OOM``, ``MISCONF``, or an evicting policy.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from datetime import datetime, timezone

import fakeredis
import pytest
import redis

from backends.redis import POLICY_RECHECK_SECONDS, RedisStore
from optin_service import create_app
from optin_service.storage import OptInRecord, StorageUnavailable
from tests.servers import RedisProcess, free_port
from tests.topologies import ClusterTopology, slot_of, wait_until

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
PATH = "/client/users/member-1/profile/optin"


def _server(tmp_path, *args: str) -> RedisProcess:
    """A redis-server of the test's own (the test changes its configuration)."""
    return RedisProcess(tmp_path / "redis", ["--save", "", "--appendonly", "no", *args]).start()


def _write(store: RedisStore, cid: str = "member-1") -> OptInRecord:
    record = OptInRecord(cid, "accepted", STAMP, request_id=uuid.uuid4().hex)
    return store.set(record)


def _refused(store: RedisStore) -> bool:
    try:
        _write(store)
    except StorageUnavailable:
        return True
    return False


# --- eviction policy ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis_server
def test_an_evicting_policy_refuses_every_write_until_it_is_changed(tmp_path):
    server = _server(tmp_path, "--maxmemory-policy", "allkeys-lru")
    raw = server.client()
    store = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        with pytest.raises(StorageUnavailable, match=r"allkeys-lru.*noeviction"):
            _write(store)
        with pytest.raises(StorageUnavailable, match="allkeys-lru"):
            store.import_events([OptInRecord("member-2", "declined", STAMP)])
        with pytest.raises(StorageUnavailable, match="allkeys-lru"):
            store.check()
        assert raw.dbsize() == 0  # nothing written, not even check()'s own key

        # Changed at runtime: writes work again within about a second.
        raw.config_set("maxmemory-policy", "noeviction")
        wait_until("writes accepted under noeviction", lambda: not _refused(store), timeout=3)
        store.check()
        # A volatile-* policy evicts only keys with a TTL: a member's state has none.
        raw.config_set("maxmemory-policy", "volatile-lru")
        store.check()
        assert store.import_events([OptInRecord("member-2", "declined", STAMP)]) == 1
        # And back to evicting: refused again, once the cached answer is a second old.
        for policy in ("allkeys-lfu", "allkeys-random"):
            raw.config_set("maxmemory-policy", policy)
            wait_until(f"writes refused under {policy}", lambda: _refused(store), timeout=3)
            with pytest.raises(StorageUnavailable, match=policy):
                store.check()
    finally:
        store.close()
        raw.close()
        server.stop()


@pytest.mark.slow
@pytest.mark.redis_server
def test_an_evicting_policy_answers_503_in_the_envelope_and_readyz_503(tmp_path, caplog):
    server = _server(tmp_path, "--maxmemory-policy", "allkeys-lru")
    raw = server.client()
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": f"redis://127.0.0.1:{server.port}/0"})
    client = app.test_client()
    try:
        with caplog.at_level(logging.WARNING, logger="optin_service"):
            response = client.put(PATH, json={"LOYALTY_OPTIN": "accepted"})
        assert response.status_code == 503
        assert response.get_json() == {
            "statusCode": 503,
            "errorCode": "SERVICE_UNAVAILABLE",
            "errorMessage": "Storage is unavailable, please retry later: Redis's "
            "maxmemory-policy allkeys-lru may evict consent records; writes are refused "
            "until it is noeviction or a volatile-* policy",
        }
        assert response.headers["Retry-After"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        # The operator's log says why and what to set.
        assert any(
            "allkeys-lru" in r.getMessage() and "noeviction" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["errorCode"] == "SERVICE_UNAVAILABLE"
        assert "maxmemory-policy allkeys-lru" in ready.get_json()["errorMessage"]
        assert client.get(PATH).status_code == 404
        assert raw.dbsize() == 0
    finally:
        app.extensions["optin"].store.close()
        raw.close()
        server.stop()


# --- check(): can the store write right now? -----------------------------------------


def _read_only_replica(raw: redis.Redis, tmp_path) -> None:
    raw.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that never answers


def _no_replicas(raw: redis.Redis, tmp_path) -> None:
    raw.config_set("min-replicas-to-write", 1)


def _out_of_memory(raw: redis.Redis, tmp_path) -> None:
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", 1)


def _failed_save(raw: redis.Redis, tmp_path) -> None:
    # The server's folder is gone: its snapshot fails, and stop-writes-on-bgsave-error
    # (the default) then refuses writes with MISCONF.
    shutil.rmtree(tmp_path / "redis")
    raw.config_set("save", "3600 1")
    raw.bgsave()
    wait_until(
        "a failed snapshot",
        lambda: raw.info("persistence")["rdb_last_bgsave_status"] == "err",
        timeout=5,
    )


_UNDO = {
    _read_only_replica: lambda raw: raw.execute_command("REPLICAOF", "NO", "ONE"),
    _no_replicas: lambda raw: raw.config_set("min-replicas-to-write", 0),
    _out_of_memory: lambda raw: raw.config_set("maxmemory", 0),
    _failed_save: lambda raw: raw.config_set("stop-writes-on-bgsave-error", "no"),
}


@pytest.mark.slow
@pytest.mark.redis_server
@pytest.mark.parametrize(
    "refuse",
    [
        pytest.param(_read_only_replica, id="read-only-replica"),
        pytest.param(_no_replicas, id="noreplicas"),
        pytest.param(_out_of_memory, id="oom"),
        pytest.param(_failed_save, id="misconf"),
    ],
)
def test_check_fails_while_the_server_refuses_writes(tmp_path, refuse):
    """The server answers PING in each case (but MISCONF, where Redis refuses PING
    too): only a write shows the fault."""
    server = _server(tmp_path)
    raw = server.client()
    store = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        store.check()
        refuse(raw, tmp_path)
        with pytest.raises(StorageUnavailable):
            _write(store)
        with pytest.raises(StorageUnavailable):
            store.check()
        _UNDO[refuse](raw)
        store.check()
        _write(store)
    finally:
        store.close()
        raw.close()
        server.stop()


def test_checks_key_is_short_lived_and_outside_every_member():
    """check() writes one key under the store's prefix, with an expiry, that no member's
    keys can be and that export and counting do not see."""
    store = RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="p:")
    store.check()
    keys = list(store.client.scan_iter(match="*"))
    assert len(keys) == 1 and keys[0].startswith(b"p:{")
    assert 0 < store.client.ttl(keys[0]) <= 60
    assert store.count_events() == 0 and list(store.events()) == []
    _write(store)
    assert store.count_events() == 1
    store.check()
    keys = sorted(store.client.scan_iter(match="*"))
    assert keys == [b"p:feed", b"p:{%check}", b"p:{member-1}", b"p:{member-1}:h"]


@pytest.mark.slow
@pytest.mark.redis_server
def test_sentinel_check_fails_while_its_master_refuses_writes(sentinel_topology):
    store = RedisStore.from_url(sentinel_topology.url(prefix=f"t-{uuid.uuid4().hex[:12]}:"))
    with sentinel_topology.master().client() as master:
        try:
            store.check()
            master.config_set("min-replicas-to-write", 2)  # it has one
            with pytest.raises(StorageUnavailable):
                store.check()
        finally:
            master.config_set("min-replicas-to-write", 0)
            store.close()
    # Test's own keys: only check()'s, which expire by themselves.


def _cluster_store(cluster_topology) -> RedisStore:
    return RedisStore.from_url(cluster_topology.url(prefix=f"t-{uuid.uuid4().hex[:12]}:"))


def _another_master(cluster_topology, store: RedisStore) -> RedisProcess:
    """A master that does not hold member-1's keys."""
    owner = cluster_topology.slot_owner(slot_of(store.key("member-1")))
    return cluster_topology.node_by_id(next(i for i in cluster_topology.master_ids() if i != owner))


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_refuses_writes_while_any_master_may_evict(cluster_topology):
    store = _cluster_store(cluster_topology)
    other = _another_master(cluster_topology, store)
    try:
        with other.client() as node:
            node.config_set("maxmemory-policy", "allkeys-lru")
        # member-1's keys are not on that master: refused all the same.
        with pytest.raises(StorageUnavailable, match="allkeys-lru") as refused:
            _write(store)
        assert f":{other.port}" in str(refused.value)  # names the master
        with pytest.raises(StorageUnavailable, match="allkeys-lru"):
            store.import_events([OptInRecord("member-2", "declined", STAMP)])
        with pytest.raises(StorageUnavailable, match="allkeys-lru"):
            store.check()
        assert store.get("member-1") is None and store.get("member-2") is None
    finally:
        with other.client() as node:
            node.config_set("maxmemory-policy", "noeviction")
    try:
        wait_until("writes accepted again", lambda: not _refused(store), timeout=3)
        store.check()
    finally:
        store.client.delete(store.key("member-1"), store.key("member-1") + ":h")
        store.close()


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_check_writes_on_every_master(cluster_topology):
    store = _cluster_store(cluster_topology)
    other = _another_master(cluster_topology, store)
    try:
        store.check()
        for port in cluster_topology.master_ids().values():
            with cluster_topology.node_at(port).client() as node:
                keys = list(node.scan_iter(match=f"{store.prefix}*"))
                assert len(keys) == 1 and node.ttl(keys[0]) > 0, (port, keys)
        with other.client() as node:
            node.config_set("min-replicas-to-write", 1)  # it has none: NOREPLICAS
        with pytest.raises(StorageUnavailable, match="NOREPLICAS"):
            store.check()
    finally:
        with other.client() as node:
            node.config_set("min-replicas-to-write", 0)
    try:
        store.check()
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_a_dead_master_does_not_stop_writes_to_the_others(tmp_path):
    """With cluster-require-full-coverage no, the other masters keep serving: reading
    eviction policies before a write skips a master that does not answer (its own
    members' writes fail, and check() reports it)."""
    topology = ClusterTopology(tmp_path / "cluster")
    try:
        topology.start()
        for node in topology.nodes:
            with node.client() as c:
                c.config_set("cluster-require-full-coverage", "no")
        store = RedisStore.from_url(topology.url(prefix="t:"))
        victim = topology.nodes[0]
        victim_id = next(i for i, p in topology.master_ids().items() if p == victim.port)
        victim_slots = set(topology.slots_of(victim_id))
        alive = [f"m-{i}" for i in range(50) if slot_of(store.key(f"m-{i}")) not in victim_slots]
        for cid in alive[:5]:  # loads the script on every master while all answer
            _write(store, cid)
        store.check()
        victim.kill()
        with pytest.raises(StorageUnavailable):
            store.check()
        for cid in alive[:5]:
            _write(store, cid)  # no master's policy is trusted any more after a second
            time.sleep(POLICY_RECHECK_SECONDS / 2)
        store.close()
    finally:
        topology.stop()
