"""Redis beyond one server: Sentinel and Cluster URLs, the store contract on both,
and failures on loopback (failover, SIGKILL of a master, slots moving under load).

The topologies come from tests/topologies.py. The contract runs on session-wide
ones (started only if these tests run); anything destructive starts its own in
``tmp_path`` and stops it in a ``finally``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest
import requests

from backends.redis import RedisClusterStore, RedisSentinelStore, RedisStore
from optin_service import create_app
from optin_service.registry import store_from_url
from optin_service.storage import IdempotencyKeyReused, OptInRecord, StorageUnavailable
from optin_service.testing import StoreContract
from tests.failover import STATUSES, TIMEOUT, Readiness, WriteLoad, gunicorn_log_tail, wait_ready
from tests.redis_feed import (
    RedisCursors,
    assert_each_change_once_in_member_order,
    tail_while_writing,
)
from tests.servers import LOOPBACK, Gunicorn, free_port
from tests.topologies import ClusterTopology, SentinelTopology, slot_of, wait_until

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
#: The setting create_app reads from the environment (the stores never read it).
MIN_REPLICAS_ENV = "OPTIN_REDIS_MIN_REPLICAS_ACKED"


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
def test_min_replicas_acked_comes_from_the_keyword_unless_the_url_says(monkeypatch, scheme):
    path = {"redis": "/0", "redis+sentinel": "/svc", "redis+cluster": ""}[scheme]
    base = f"{scheme}://127.0.0.1:{free_port()}{path}"
    monkeypatch.setenv(MIN_REPLICAS_ENV, "1")  # the app's to read, never the store's
    stores = [
        from_keyword := RedisStore.from_url(base, min_replicas_acked=1),
        from_url := RedisStore.from_url(base + "?min_replicas_acked=0", min_replicas_acked=1),
        from_nothing := RedisStore.from_url(base),
        from_config := store_from_url(base, {MIN_REPLICAS_ENV: "2"}),
    ]
    try:
        assert (from_keyword.min_replicas_acked, from_keyword.wait_timeout_ms) == (1, 500)
        assert from_url.min_replicas_acked == 0
        assert from_nothing.min_replicas_acked == 0
        assert from_config.min_replicas_acked == 2
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel", "redis+cluster"])
def test_import_batch_comes_from_the_url(scheme):
    path = {"redis": "/0", "redis+sentinel": "/svc", "redis+cluster": ""}[scheme]
    base = f"{scheme}://127.0.0.1:{free_port()}{path}"
    default = 1000 if scheme == "redis+cluster" else 5000
    stores = [RedisStore.from_url(base), RedisStore.from_url(base + "?import_batch=7")]
    try:
        assert [store.import_batch for store in stores] == [default, 7]
    finally:
        for store in stores:
            store.close()


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
        "redis://127.0.0.1:6379/0?import_batch=0",
        "redis+sentinel://127.0.0.1:26379/svc?import_batch=many",
        "redis+cluster://127.0.0.1:7000?import_batch=-5",
    ],
)
def test_bad_urls_raise_value_error(url, monkeypatch):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    with pytest.raises(ValueError):
        RedisStore.from_url(url)


def test_a_bad_environment_value_raises_value_error(monkeypatch):
    monkeypatch.setenv(MIN_REPLICAS_ENV, "some")
    with pytest.raises(ValueError, match=MIN_REPLICAS_ENV):
        create_app({"OPTIN_STORAGE_URL": f"redis+sentinel://127.0.0.1:{free_port()}/svc"})


@pytest.mark.parametrize("value", [-1, "some"])
def test_a_bad_keyword_value_raises_value_error(value):
    with pytest.raises(ValueError, match="min_replicas_acked"):
        RedisStore.from_url(
            f"redis+sentinel://127.0.0.1:{free_port()}/svc", min_replicas_acked=value
        )


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
class TestSentinelContract(RedisCursors, StoreContract):
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
class TestClusterContract(RedisCursors, StoreContract):
    """The contract, with the Cluster's promise for a reader tailing the feed: across
    groups, changes are ordered by the masters' clocks rather than by commit, so the
    tail holds the same changes as a full read, each member's in the same order."""

    @pytest.fixture
    def store(self, cluster_topology, monkeypatch):
        monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
        store = RedisStore.from_url(cluster_topology.url(prefix=_unique_prefix()))
        yield store
        _dispose(store)

    def test_a_reader_tailing_while_threads_write_sees_each_change_once_in_order(self, store):
        members = [f"member-{i}" for i in range(6)]
        tailed, full, while_writing = tail_while_writing(store, members)
        assert while_writing > 0
        assert_each_change_once_in_member_order(store, tailed, full)
        assert {c.event.correlation_id for c in full} == set(members)


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
        on_master = master.get(key)
        assert on_master == f"{record.updated_at_us}0"  # accepted
        assert master.execute_command("WAIT", 1, 2000) == 1
    with sentinel_topology.replica().client() as replica:
        assert replica.get(key) == on_master
        assert replica.zcard(key + ":h") == 1
    sentinel_store.check()


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
            strict.set(dataclasses.replace(record, request_id="r2"), idempotency_key="k")
        assert one.set(dataclasses.replace(record, request_id="r3"), idempotency_key="k") == record
        assert one.history("member-1", 10) == [record]
        with pytest.raises(IdempotencyKeyReused):  # refused before any waiting
            strict.set(dataclasses.replace(record, status="accepted"), idempotency_key="k")
        batch = [OptInRecord(f"member-{i}", "accepted", STAMP) for i in range(2, 6)]
        with pytest.raises(StorageUnavailable):
            strict.import_events(batch)
        assert one.import_events(batch) == 0  # the first import did land on the master
        assert one.count_events() == 5
    finally:
        strict.close()
        _dispose(one)


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


# --- failover through gunicorn ----------------------------------------------------------

MAX_GAP = 10.0  # seconds without an acknowledged write, at most


@pytest.mark.slow
@pytest.mark.redis_server
@pytest.mark.parametrize("replicas_acked", [0, 1], ids=["no-wait", "wait-1"])
@pytest.mark.parametrize("fault", ["sentinel-failover", "sigkill-master"])
def test_writes_through_gunicorn_survive_a_failover(
    tmp_path, monkeypatch, record_property, fault, replicas_acked
):
    """Writes run without pause through gunicorn while the master changes.

    Writes resume within 10 s; with OPTIN_REDIS_MIN_REPLICAS_ACKED=1 every
    acknowledged write is readable afterwards; without it, the acknowledged
    writes lost are counted and reported (not asserted: that is the figure).
    """
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    topology = SentinelTopology(tmp_path / "topology")
    prefix = _unique_prefix()
    server: Gunicorn | None = None
    load: WriteLoad | None = None
    ready: Readiness | None = None
    try:
        topology.start()
        env = {
            "OPTIN_STORAGE_URL": topology.url(prefix=prefix),
            MIN_REPLICAS_ENV: str(replicas_acked),
            "GUNICORN_CMD_ARGS": "",  # an inherited one would override the shipped config
        }
        server = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
        wait_ready(server)

        load = WriteLoad(server.base).start()
        ready = Readiness(server.base).start()
        started = time.monotonic()
        wait_until("writes flowing", lambda: load.acks_after(started) >= 20, timeout=10)
        time.sleep(1.0)

        old = topology.master_port()
        fault_at = time.monotonic()
        if fault == "sentinel-failover":
            topology.failover()
        else:
            topology.node(old).kill()
        new = topology.wait_for_new_master(old, timeout=20)
        promoted_at = time.monotonic()
        if fault == "sigkill-master":
            # The supervisor brings the node back, as a replica of the master the
            # Sentinels now name (Sentinel would only turn it into one ~10 s later).
            topology.node(old).start("--replicaof", LOOPBACK, str(new))
        wait_until(
            "writes acknowledged after the fault",
            lambda: load.acks_after(promoted_at) >= 20,
            timeout=MAX_GAP + 5,
            every=0.05,
        )
        time.sleep(1.5)
        load.stop()
        ended = time.monotonic()
        ready.stop()

        gap, gap_start = load.longest_gap(started, ended)
        topology.wait_stable(timeout=20)
        reader = RedisStore.from_url(topology.url(prefix=prefix, min_replicas_acked=0))
        try:
            lost = sorted(
                cid for cid, status in load.acked.items() if _status(reader, cid) != status
            )
            late = sum(1 for cid, status in load.given_up.items() if _status(reader, cid) == status)
        finally:
            reader.close()

        summary = (
            f"{fault} {'WAIT 1' if replicas_acked else 'no WAIT'}: "
            f"{len(load.acked)} writes acknowledged, {len(lost)} lost; "
            f"longest gap without an ack {gap:.2f}s (from {gap_start - fault_at:+.2f}s "
            f"to {gap_start + gap - fault_at:+.2f}s after the fault), "
            f"new master after {promoted_at - fault_at:.2f}s; "
            f"answers {dict(load.answers)}; {len(load.given_up)} given up ({late} applied)"
        )
        print(summary)
        record_property("failover", summary)
        record_property("lost_acknowledged_writes", len(lost))
        context = summary + gunicorn_log_tail(server)

        assert not load.unexpected, f"{load.unexpected[:10]}\n{context}"
        assert len(load.acked) >= 100, f"too little load to mean anything: {context}"
        assert gap < MAX_GAP, context
        assert not load.given_up, context
        if replicas_acked:
            assert not lost, f"acknowledged with WAIT 1, then lost: {lost[:20]}\n{context}"
        if fault == "sigkill-master":
            during = ready.codes_between(fault_at, promoted_at)
            assert 503 in during, f"/readyz during the outage: {during}\n{context}"
        assert ready.seen and ready.seen[-1][1] == 200, f"/readyz at the end: {ready.seen[-5:]}"
    finally:
        if load is not None:
            load.stopping.set()
        if ready is not None:
            ready.stopping.set()
        if server is not None:
            server.stop()
        topology.stop()


def _status(store: RedisStore, cid: str) -> str | None:
    record = store.get(cid)
    return None if record is None else record.status


# --- Cluster: slots moving under load ----------------------------------------------------


class MemberLoad:
    """Client threads rewriting a fixed set of members through gunicorn, round-robin,
    and creating new ones, each logical write retried with its Idempotency-Key after a
    503 or a lost connection (bounded). Keeps, per logical write that failed at least
    once, how long it took to be acknowledged after its first failure."""

    def __init__(self, base: str, live: list[str], fresh: list[str], threads: int = 4) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.acked: dict[str, list[str]] = {}  # id -> statuses acknowledged, in order
        self.ack_times: list[float] = []
        self.failed_for: list[float] = []  # seconds from first failure to the ack
        self.given_up: list[str] = []
        self.answers: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._writer, args=(live[tid::threads], fresh[tid::threads]), daemon=True
            )
            for tid in range(threads)
        ]

    def start(self) -> MemberLoad:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=40)
        assert not any(t.is_alive() for t in self.threads), "writers did not stop"

    def _writer(self, live: list[str], fresh: list[str]) -> None:
        try:
            with requests.Session() as http:
                for n in range(1_000_000):
                    if self.stopping.is_set():
                        return
                    if n % 3 == 2 and fresh:  # a member never written before
                        cid = fresh.pop()
                    else:
                        cid = live[n % len(live)]
                    self.write(http, cid, STATUSES[n % 2])
        except Exception as exc:
            with self.lock:
                self.unexpected.append(repr(exc))

    def write(self, http: requests.Session, cid: str, status: str) -> None:
        key = uuid.uuid4().hex
        first_failure = None
        deadline = time.monotonic() + 20
        url = f"{self.base}/client/users/{cid}/profile/optin"
        for _ in range(2000):
            if time.monotonic() > deadline:
                break
            try:
                resp = http.put(
                    url,
                    json={"LOYALTY_OPTIN": status},
                    headers={"Idempotency-Key": key},
                    timeout=TIMEOUT,
                )
                code = str(resp.status_code)
            except requests.RequestException as exc:
                resp, code = None, type(exc).__name__
            now = time.monotonic()
            with self.lock:
                self.answers[code] += 1
                if code == "200":
                    self.acked.setdefault(cid, []).append(status)
                    self.ack_times.append(now)
                    if first_failure is not None:
                        self.failed_for.append(now - first_failure)
                    return
                if resp is not None and code != "503":
                    self.unexpected.append(f"PUT {cid}: {code} {resp.text[:200]}")
                    return
            first_failure = first_failure or now
            time.sleep(0.05)
        with self.lock:
            self.given_up.append(cid)


def _ids_in_slots(store: RedisStore, slots: set[int], count: int, tag: str) -> list[str]:
    found = []
    for i in range(2_000_000):
        cid = f"{tag}-{i}"
        if slot_of(store.key(cid)) in slots:
            found.append(cid)
            if len(found) == count:
                return found
    raise AssertionError(f"not {count} ids in {len(slots)} slots")


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_reshard_under_load_loses_nothing_and_fails_no_write_for_longer(
    tmp_path, monkeypatch
):
    """``redis-cli --cluster reshard`` moves slots holding live members while writes run
    through gunicorn: no write fails for longer than the migration, none is lost."""
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    topology = ClusterTopology(tmp_path / "cluster")
    prefix = _unique_prefix()
    server: Gunicorn | None = None
    load: MemberLoad | None = None
    moving_count = 1500
    try:
        topology.start()
        url = topology.url(prefix=prefix)
        source, target = topology.slot_owner(0), topology.slot_owner(16383)
        # redis-cli moves the source's lowest slots first.
        moving = set(topology.slots_of(source)[:moving_count])
        store = RedisStore.from_url(url)
        try:
            live = _ids_in_slots(store, moving, 80, "live")
            fresh = _ids_in_slots(store, moving, 2000, "new")
            # Ballast in the moving slots, so that the migration takes a while.
            ballast = _ids_in_slots(store, moving, 6000, "ballast")
            events = [OptInRecord(cid, "accepted", STAMP) for cid in ballast]
            assert store.import_events(events) == len(events)
        finally:
            store.close()

        env = {"OPTIN_STORAGE_URL": url, MIN_REPLICAS_ENV: "0", "GUNICORN_CMD_ARGS": ""}
        server = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
        wait_ready(server)
        load = MemberLoad(server.base, live, fresh).start()
        wait_until("writes flowing", lambda: len(load.ack_times) >= 100, timeout=15)

        reshard_started = time.monotonic()
        took = topology.reshard(source, target, moving_count, timeout=120)
        reshard_ended = time.monotonic()
        time.sleep(1.0)
        load.stop()

        topology.wait_ok()
        moved = moving & set(topology.slots_of(target))
        assert moved == moving, f"{len(moving - moved)} slots did not move"
        during = sum(1 for t in load.ack_times if reshard_started <= t <= reshard_ended)
        longest_failure = max(load.failed_for, default=0.0)

        reader = RedisStore.from_url(url)
        try:
            wrong = []
            for cid, statuses in load.acked.items():
                current = reader.get(cid)
                history = reader.history(cid, 10_000)
                if current is None or current.status != statuses[-1]:
                    wrong.append(f"{cid}: acked {statuses[-1]} last, reads {current}")
                elif len(history) < len(statuses):
                    wrong.append(f"{cid}: {len(statuses)} writes acked, {len(history)} events")
            ballast_events = sum(1 for cid in ballast[:200] if reader.get(cid) is not None)
        finally:
            reader.close()

        summary = (
            f"reshard of {moving_count} slots ({len(ballast)} ballast members) took {took:.2f}s; "
            f"{len(load.ack_times)} writes acknowledged, {during} during the migration, "
            f"on {len(load.acked)} members; longest time a write kept failing "
            f"{longest_failure:.2f}s ({len(load.failed_for)} writes failed at least once); "
            f"answers {dict(load.answers)}; {len(wrong)} wrong reads"
        )
        print(summary)
        context = summary + gunicorn_log_tail(server)
        assert not load.unexpected, f"{load.unexpected[:10]}\n{context}"
        assert not load.given_up, context
        assert during >= 20, f"too few writes during the migration: {context}"
        assert longest_failure < took, context
        assert not wrong, f"{wrong[:20]}\n{context}"
        assert ballast_events == 200, context
    finally:
        if load is not None:
            load.stopping.set()
        if server is not None:
            server.stop()
        topology.stop()


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_with_replicas_waits_for_them_while_slots_move(tmp_path, monkeypatch):
    """min_replicas_acked on a cluster with a replica per master: each write is
    followed by WAIT on its own node's connection, through MOVED and ASK while
    ``redis-cli --cluster reshard`` moves the slots being written."""
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    # No node is meant to fail here. Once in many runs, WAITs timed out for minutes
    # and the slot's owner had no replica at the end: most likely a master busy
    # migrating slots on a loaded 2-core machine missed the default 1 s node
    # timeout and its replica took over. 5 s keeps the test about resharding
    # (the cluster takes about 2 s longer to start).
    topology = ClusterTopology(tmp_path / "cluster", replicas=1, node_timeout_ms=5000)
    try:
        topology.start()
        url = topology.url(prefix=_unique_prefix(), min_replicas_acked=1, wait_timeout_ms=1000)
        store = RedisStore.from_url(url)
        source, target = topology.slot_owner(0), topology.slot_owner(16383)
        moving = set(topology.slots_of(source)[:500])
        members = _ids_in_slots(store, moving, 40, "live")
        ballast = _ids_in_slots(store, moving, 3000, "ballast")
        assert store.import_events([OptInRecord(c, "accepted", STAMP) for c in ballast]) == 3000

        lock = threading.Lock()
        acked: dict[str, OptInRecord] = {}
        failing_for: list[float] = []
        problems: list[str] = []
        stopping = threading.Event()

        def writer(mine: list[str]) -> None:
            try:
                for n in range(100_000):
                    if stopping.is_set():
                        return
                    cid = mine[n % len(mine)]
                    record = OptInRecord.now(cid, STATUSES[n % 2], uuid.uuid4().hex)
                    first_failure = None
                    for _ in range(200):  # the same key again after a 503, bounded
                        try:
                            store.set(record, idempotency_key=record.request_id)
                        except StorageUnavailable:
                            first_failure = first_failure or time.monotonic()
                            time.sleep(0.05)
                            continue
                        with lock:
                            acked[cid] = record
                            if first_failure is not None:
                                failing_for.append(time.monotonic() - first_failure)
                        break
                    else:
                        with lock:
                            problems.append(f"{cid}: never acknowledged")
            except Exception as exc:
                with lock:
                    problems.append(repr(exc))

        threads = [
            threading.Thread(target=writer, args=(members[i::4],), daemon=True) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_until("writes flowing", lambda: len(acked) >= 20, timeout=10)
            took = topology.reshard(source, target, len(moving), timeout=120)
            time.sleep(0.5)
        finally:
            stopping.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not problems, problems[:10]
        assert max(failing_for, default=0.0) < took, (failing_for, took)
        assert moving <= set(topology.slots_of(target))
        for cid, record in acked.items():
            assert store.get(cid) == record
            # On the replica of the master that now owns it, too.
            owner = topology.node_by_id(topology.slot_owner(slot_of(store.key(cid))))
            with owner.client() as c:
                replicas = c.execute_command("ROLE")[2]
            with topology.node_at(int(replicas[0][1])).client() as replica:
                replica.execute_command("READONLY")
                declined = int(record.status == "declined")
                value = replica.get(store.key(cid))  # then ":<version>" from the 2nd change
                assert value.partition(":")[0] == f"{record.updated_at_us}{declined}"
                assert value == store.client.get(store.key(cid)).decode()
        print(
            f"cluster with replicas, WAIT 1: reshard of {len(moving)} slots took {took:.2f}s; "
            f"{len(acked)} members written, {len(failing_for)} writes answered 503 first, "
            f"longest {max(failing_for, default=0.0):.2f}s"
        )
        store.close()
    finally:
        topology.stop()


@pytest.mark.slow
@pytest.mark.redis_server
def test_cluster_a_dead_master_makes_it_unready_and_503_fast_then_it_recovers(
    tmp_path, monkeypatch
):
    monkeypatch.delenv(MIN_REPLICAS_ENV, raising=False)
    topology = ClusterTopology(tmp_path / "cluster")
    try:
        topology.start()
        store = RedisStore.from_url(topology.url(prefix=_unique_prefix()))
        ids = [f"member-{i}" for i in range(30)]
        for cid in ids:
            store.set(OptInRecord(cid, "accepted", STAMP))
        store.check()
        victim = topology.nodes[0]
        victim.kill()

        def unready() -> bool:
            try:
                store.check()
            except StorageUnavailable:
                return True
            return False

        wait_until("check() failing", unready, timeout=10, every=0.1)
        # Once the others agree it failed, the cluster is down for every member.
        wait_until("cluster_state:fail", lambda: _cluster_down(topology), timeout=10)
        for cid in ids[:6]:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                store.set(OptInRecord(cid, "declined", STAMP.replace(second=1)))
            assert time.monotonic() - started < 2.0

        victim.start()  # same port, directory, AOF and nodes.conf
        topology.wait_ok(timeout=20)
        wait_until("check() passing", lambda: not unready(), timeout=10, every=0.1)
        for cid in ids:
            assert store.get(cid) is not None  # what was acknowledged survived (AOF)
        store.set(OptInRecord(ids[0], "declined", STAMP.replace(second=2)))
        _dispose(store)
    finally:
        topology.stop()


def _cluster_down(topology: ClusterTopology) -> bool:
    for node in topology.running():
        with node.client() as c:
            if c.execute_command("CLUSTER INFO")["cluster_state"] != "fail":
                return False
    return True
