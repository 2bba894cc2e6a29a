"""Redis beyond one server: Sentinel and Cluster URLs, the store contract on both,
and failures on loopback (failover, SIGKILL of a master, slots moving under load).

The topologies come from tests/topologies.py. The contract runs on session-wide
ones (started only if these tests run); anything destructive starts its own in
``tmp_path`` and stops it in a ``finally``.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest

from backends.redis import (
    MIN_REPLICAS_ENV,
    RedisClusterStore,
    RedisSentinelStore,
    RedisStore,
)
from optin_service.registry import store_from_url
from optin_service.storage import IdempotencyKeyReused, OptInRecord, StorageUnavailable
from optin_service.testing import StoreContract
from tests.servers import free_port
from tests.topologies import slot_of

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}:"


def _dispose(store: RedisStore) -> None:
    """Delete the store's keys (one at a time: a cluster has no cross-slot DEL) and close it."""
    try:
        keys = list(store.client.scan_iter(match=f"{store.prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            pipe = store.client.pipeline(transaction=False)
            for key in keys[start : start + 500]:
                pipe.delete(key)
            pipe.execute()
    finally:
        store.close()


# --- URLs (no server needed) ---------------------------------------------------------


def test_registry_builds_sentinel_and_cluster_stores_without_connecting():
    dead = f"127.0.0.1:{free_port()}"
    sentinel = store_from_url(f"redis+sentinel://{dead}/svc")
    cluster = store_from_url(f"redis+cluster://{dead}")
    try:
        assert isinstance(sentinel, RedisSentinelStore)
        assert isinstance(cluster, RedisClusterStore)
        assert cluster._client is None  # built on first use, after any fork
    finally:
        sentinel.close()
        cluster.close()


def test_sentinel_url_parts(monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    store = RedisStore.from_url(
        "redis+sentinel://us%40r:p%3Ass@127.0.0.1:26379,[::1]:26380,localhost/my-svc/3"
        "?prefix=x:&min_replicas_acked=2&wait_timeout_ms=250&socket_timeout=0.25"
        "&sentinel_password=s3"
    )
    try:
        assert isinstance(store, RedisSentinelStore)
        assert store.service_name == "my-svc"
        assert store.prefix == "x:"
        assert (store.min_replicas_acked, store.wait_timeout_ms) == (2, 250)
        sentinels = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in store.sentinel.sentinels
        ]
        assert sentinels == [("127.0.0.1", 26379), ("::1", 26380), ("localhost", 26379)]
        assert store.sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "s3"
        kwargs = store.client.connection_pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("us@r", "p:ss", 3)
        assert kwargs["socket_timeout"] == 0.25
    finally:
        store.close()


def test_cluster_url_parts(monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    store = RedisStore.from_url("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001/?prefix=c:")
    try:
        assert isinstance(store, RedisClusterStore)
        assert store.prefix == "c:"
        assert store.min_replicas_acked == 0
    finally:
        store.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel", "redis+cluster"])
def test_min_replicas_acked_comes_from_the_environment_unless_the_url_says(monkeypatch, scheme):
    path = {"redis": "/0", "redis+sentinel": "/svc", "redis+cluster": ""}[scheme]
    base = f"{scheme}://127.0.0.1:{free_port()}{path}"
    monkeypatch.setenv(MIN_REPLICAS_ENV, "1")
    from_env = RedisStore.from_url(base)
    from_url = RedisStore.from_url(base + "?min_replicas_acked=0")
    try:
        assert (from_env.min_replicas_acked, from_env.wait_timeout_ms) == (1, 500)
        assert from_url.min_replicas_acked == 0
    finally:
        from_env.close()
        from_url.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service name
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1:26379/svc/zero",
        "redis+sentinel://127.0.0.1:26379/svc/0/extra",
        "redis+sentinel://127.0.0.1:notaport/svc",
        "redis+sentinel://127.0.0.1:26379,/svc",
        "redis+sentinel://127.0.0.1:26379/svc?bogus=1",
        "redis+sentinel://127.0.0.1:26379/svc?min_replicas_acked=-1",
        "redis+sentinel://127.0.0.1:26379/svc?min_replicas_acked=one",
        "redis+sentinel://127.0.0.1:26379/svc?wait_timeout_ms=0",
        "redis+sentinel://127.0.0.1:26379/svc?socket_timeout=0",
        "redis+sentinel://127.0.0.1:26379/svc?socket_timeout=nan",
        "redis+cluster://127.0.0.1:7000/0",
        "redis+cluster://127.0.0.1:70000",
        "redis+cluster://127.0.0.1:7000?db=1",
        "redis://127.0.0.1:6379/0?min_replicas_acked=x",
        "redis://127.0.0.1:6379/0?wait_timeout_ms=0",
    ],
)
def test_bad_urls_raise_value_error(url, monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    with pytest.raises(ValueError):
        RedisStore.from_url(url)


def test_a_bad_environment_value_raises_value_error(monkeypatch):
    monkeypatch.setenv(MIN_REPLICAS_ENV, "some")
    with pytest.raises(ValueError, match=MIN_REPLICAS_ENV):
        RedisStore.from_url(f"redis+sentinel://127.0.0.1:{free_port()}/svc")


@pytest.mark.parametrize("scheme", ["redis+sentinel", "redis+cluster"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.set(OptInRecord("member-1", "accepted", STAMP)), id="set"),
        pytest.param(lambda s: s.get("member-1"), id="get"),
        pytest.param(lambda s: s.check(), id="check"),
        pytest.param(lambda s: s.import_events([OptInRecord("m", "accepted", STAMP)]), id="import"),
        pytest.param(lambda s: s.count_events(), id="count"),
    ],
)
def test_nothing_listening_is_unavailable_within_2s(scheme, call):
    hosts = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    store = RedisStore.from_url(f"{scheme}://{hosts}" + ("/svc" if "sentinel" in scheme else ""))
    try:
        for _ in range(2):  # and again: no state left behind makes the second one slower
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                call(store)
            assert time.monotonic() - started < 2.0
    finally:
        store.close()


# --- the store contract on both topologies -------------------------------------------


@pytest.mark.slow
@pytest.mark.redis_server
class TestSentinelContract(StoreContract):
    @pytest.fixture(params=["no-wait", "wait-1"])
    def store(self, request, sentinel_topology, monkeypatch):
        monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
        options = {"prefix": _unique_prefix()}
        if request.param == "wait-1":
            options["min_replicas_acked"] = 1
        store = RedisStore.from_url(sentinel_topology.url(**options))
        yield store
        _dispose(store)


@pytest.mark.slow
@pytest.mark.redis_server
class TestClusterContract(StoreContract):
    @pytest.fixture
    def store(self, cluster_topology, monkeypatch):
        monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
        store = RedisStore.from_url(cluster_topology.url(prefix=_unique_prefix()))
        yield store
        _dispose(store)


# --- Sentinel: what the topology adds -------------------------------------------------


@pytest.fixture
def sentinel_store(sentinel_topology, monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    store = RedisStore.from_url(sentinel_topology.url(prefix=_unique_prefix()))
    yield store
    _dispose(store)


@pytest.mark.slow
@pytest.mark.redis_server
def test_sentinel_writes_reach_the_master_and_its_replica(sentinel_topology, sentinel_store):
    record = OptInRecord("member-1", "accepted", STAMP, "r1", "sms")
    assert sentinel_store.set(record, idempotency_key="k") == record
    key = sentinel_store.key("member-1")
    with sentinel_topology.master().client() as master:
        assert master.get(key).startswith("accepted:")
        master.execute_command("WAIT", 1, 2000)
    with sentinel_topology.replica().client() as replica:
        assert replica.get(key) == master_value(sentinel_topology, key)
        assert replica.zcard(key + ":h") == 1
    sentinel_store.check()


def master_value(topology, key: str) -> str | None:
    with topology.master().client() as master:
        return master.get(key)


@pytest.mark.slow
@pytest.mark.redis_server
def test_sentinel_wait_shortfall_is_unavailable_and_a_retry_with_the_key_is_safe(
    sentinel_topology, monkeypatch
):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    prefix = _unique_prefix()
    # Two replicas required, one exists: WAIT gives up after wait_timeout_ms.
    strict = RedisStore.from_url(
        sentinel_topology.url(prefix=prefix, min_replicas_acked=2, wait_timeout_ms=100)
    )
    one = RedisStore.from_url(sentinel_topology.url(prefix=prefix, min_replicas_acked=1))
    try:
        record = OptInRecord("member-1", "declined", STAMP, "r1", "sms")
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="1 of the 2 replicas"):
            strict.set(record, idempotency_key="k")
        assert 0.1 <= time.monotonic() - started < 1.5
        # The master has it: a 503 means "unknown", not "not written".
        assert strict.get("member-1") == record
        # A retry with the same key writes nothing new, and waits again.
        with pytest.raises(StorageUnavailable):
            strict.set(dataclass_replace(record, request_id="r2"), idempotency_key="k")
        assert one.set(dataclass_replace(record, request_id="r3"), idempotency_key="k") == record
        assert one.history("member-1", 10) == [record]
        with pytest.raises(IdempotencyKeyReused):  # refused before any waiting
            strict.set(dataclass_replace(record, status="accepted"), idempotency_key="k")
        batch = [OptInRecord(f"member-{i}", "accepted", STAMP) for i in range(2, 6)]
        with pytest.raises(StorageUnavailable):
            strict.import_events(batch)
        assert one.import_events(batch) == 0  # the first import did land on the master
        assert one.count_events() == 5
    finally:
        strict.close()
        _dispose(one)


def dataclass_replace(record: OptInRecord, **changes: object) -> OptInRecord:
    import dataclasses

    return dataclasses.replace(record, **changes)


@pytest.mark.slow
@pytest.mark.redis_server
def test_sentinel_unknown_service_is_unavailable_fast(sentinel_topology):
    store = RedisStore.from_url(sentinel_topology.url().replace("/optin-test", "/no-such-svc"))
    try:
        for call in (
            store.check,
            lambda: store.get("m"),
            lambda: store.set(OptInRecord("m", "accepted", STAMP)),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="no-such-svc"):
                call()
            assert time.monotonic() - started < 2.0
    finally:
        store.close()


# --- Cluster: what the topology adds --------------------------------------------------


@pytest.fixture
def cluster_store(cluster_topology, monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    store = RedisStore.from_url(cluster_topology.url(prefix=_unique_prefix()))
    yield store
    _dispose(store)


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_spreads_members_over_every_master_and_scans_them_all(
    cluster_topology, cluster_store
):
    store = cluster_store
    ids = [f"member-{i}" for i in range(60)]
    owners = {cluster_topology.slot_owner(slot_of(store.key(cid))) for cid in ids}
    assert len(owners) == 3, "60 members should land on all three masters"
    assert store.import_events([OptInRecord(cid, "accepted", STAMP) for cid in ids]) == 60
    for cid in ids[:30]:
        store.set(OptInRecord(cid, "declined", STAMP.replace(second=1)), idempotency_key="k")
    assert store.count_events() == 90
    assert sorted({e.correlation_id for e in store.events()}) == sorted(ids)
    # Every key of a member is on the master of its hash tag's slot.
    for cid in ids[:5]:
        key = store.key(cid)
        owner = cluster_topology.node_by_id(cluster_topology.slot_owner(slot_of(key)))
        with owner.client() as c:
            assert c.exists(key, key + ":h", key + ":i:k") == 3
    store.check()


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_wait_without_replicas_is_unavailable(cluster_topology, monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    store = RedisStore.from_url(
        cluster_topology.url(prefix=_unique_prefix(), min_replicas_acked=1, wait_timeout_ms=50)
    )
    try:
        record = OptInRecord("member-1", "accepted", STAMP)
        with pytest.raises(StorageUnavailable, match="0 of the 1 replicas"):
            store.set(record)
        assert store.get("member-1") == record  # on its master all the same
        with pytest.raises(StorageUnavailable):
            store.import_events([OptInRecord(f"m-{i}", "accepted", STAMP) for i in range(20)])
        assert store.count_events() == 21
    finally:
        _dispose(store)
