"""The Redis stores' change feed beyond the contract: the version in the state value,
ids above every pruned one, the Cluster's key layout and its merge of 64 streams."""

from __future__ import annotations

import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone

import fakeredis
import pytest

from backends.redis import RedisClusterStore, RedisStore
from backends.redis.cluster import GROUPS
from optin_service.feed import MAX_CURSOR, CursorExpired, CursorInvalid, encode_cursor
from optin_service.storage import OptInRecord
from tests.redis_feed import (
    BASE,
    assert_each_change_once_in_member_order,
    read_all,
    tail_while_writing,
)
from tests.servers import free_port
from tests.topologies import slot_of

US = timedelta(microseconds=1)


@pytest.fixture
def store():
    store = RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="p:")
    yield store
    store.close()


def _entries(changes):
    return [(c.event, c.previous, c.version) for c in changes]


# --- one server (fakeredis) ------------------------------------------------------------


def test_the_version_lives_in_the_state_value_from_the_second_change_on(store):
    first = OptInRecord("member-1", "accepted", BASE, "r1")
    store.set(first)
    key = store.key("member-1")
    assert store.client.get(key) == f"{first.updated_at_us}0".encode()  # digits: an integer
    second = OptInRecord("member-1", "declined", BASE + US, "r2")
    store.set(second)
    assert store.client.get(key) == f"{second.updated_at_us}1:2".encode()
    store.set(OptInRecord("member-1", "accepted", BASE - US, "r0"))  # older: no change
    assert store.client.get(key) == f"{second.updated_at_us}1:2".encode()
    assert store.get("member-1") == second
    assert _entries(read_all(store)) == [(first, None, 1), (second, "accepted", 2)]


def test_a_member_stored_before_the_feed_counts_as_one_change_until_a_rebuild(store):
    """A store written before the feed has states without a version and no stream."""
    old = OptInRecord("member-1", "accepted", BASE, "r1", "sms", "crm")
    store.set(old)
    store.client.delete(*store._feed_keys(0))
    newer = OptInRecord("member-1", "declined", BASE + US, "r2")
    store.set(newer)
    assert _entries(read_all(store)) == [(newer, "accepted", 2)]
    assert store.rebuild_changes() == 2
    assert _entries(read_all(store)) == [(old, None, 1), (newer, "accepted", 2)]
    assert store.client.get(store.key("member-1")) == f"{newer.updated_at_us}1:2".encode()


def test_new_changes_get_ids_above_the_greatest_pruned_even_if_the_clock_went_back(store):
    store.set(OptInRecord("member-1", "accepted", BASE, "r1"))
    start = store.changes(None, 10).changes[0].cursor
    assert store.prune_changes(datetime.now(timezone.utc) + timedelta(days=1)) == 1
    stream, marker = store._feed_keys(0)
    # As if the server's clock had since gone back an hour: the marker is ahead of it.
    ahead = (int(time.time()) + 3600) * 1_000_000
    store.client.set(marker, f"{ahead}-7")
    page = store.changes(None, 10)
    with pytest.raises(CursorExpired):
        store.changes(start, 10)
    later = OptInRecord("member-1", "declined", BASE + US, "r2")
    store.set(later)
    [(entry_id, _)] = store.client.xrange(stream)
    assert entry_id == f"{ahead}-8".encode()
    assert _entries(store.changes(page.next, 10).changes) == [(later, "accepted", 2)]


def test_a_cursor_with_another_number_of_groups_is_invalid(store):
    store.set(OptInRecord("member-1", "accepted", BASE, "r1"))
    cluster_shaped = encode_cursor("0." + ",".join(["1-0"] * GROUPS))
    with pytest.raises(CursorInvalid):
        store.changes(cluster_shaped, 10)
    with pytest.raises(CursorInvalid):  # an id beyond what a stream id can hold
        store.changes(encode_cursor(f"0.{2**64}-0"), 10)


def test_rebuild_gives_each_member_once_whatever_scan_gives(store, monkeypatch):
    """SCAN may give a key twice: each member is still replayed once."""
    for i in range(3):
        store.set(OptInRecord(f"member-{i}", "accepted", BASE, f"r{i}"))
    pages = list(store._history_keys())
    monkeypatch.setattr(store, "_history_keys", lambda: iter(pages + pages))
    assert store.rebuild_changes() == 3
    assert [c.event.correlation_id for c in read_all(store)] == [f"member-{i}" for i in range(3)]


# --- Cluster: the key layout (no server) ------------------------------------------------


def test_a_cluster_members_keys_and_its_groups_feed_share_one_slot():
    store = RedisStore.from_url(f"redis+cluster://127.0.0.1:{free_port()}?prefix=c:")
    try:
        ids = [f"member-{i}" for i in range(2000)] + ["a{b}c", "}", "%7D", "{g1}", "é"]
        groups = set()
        for cid in ids:
            group = zlib.crc32(cid.encode()) % GROUPS
            groups.add(group)
            key = store.key(cid)
            assert key.startswith(f"c:{{g{group}}}{{")
            keys = [key, key + ":h", key + ":i:some-key", *store._feed_for(cid)]
            assert {slot_of(k) for k in keys} == {slot_of(f"{{g{group}}}")}, keys
        assert groups == set(range(GROUPS))
        assert len({store.key(cid) for cid in ids}) == len(ids)
        # The longest cursor a Cluster store can give out fits.
        biggest = store._cursor("f" * 16, [(2**64 - 1, 2**64 - 1)] * GROUPS)
        assert len(biggest) <= MAX_CURSOR
        assert store._parse_cursor(biggest) == ("f" * 16, [(2**64 - 1, 2**64 - 1)] * GROUPS)
    finally:
        store.close()


# --- Cluster (real) -------------------------------------------------------------------


@pytest.fixture
def cluster_store(cluster_topology, monkeypatch):
    monkeypatch.delenv("OPTIN_REDIS_MIN_REPLICAS_ACKED", raising=False)
    store = RedisStore.from_url(cluster_topology.url(prefix=f"t-{uuid.uuid4().hex[:12]}:"))
    yield store
    try:
        for key in store.client.scan_iter(match=f"{store.prefix}*", count=1000):
            store.client.delete(key)
    finally:
        store.close()


def _one_member_per_group(store: RedisClusterStore, tag: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for i in range(100_000):
        found.setdefault(store._group_of(f"{tag}-{i}"), f"{tag}-{i}")
        if len(found) == GROUPS:
            return found
    raise AssertionError("not every group reached")


@pytest.mark.redis_server
def test_cluster_a_write_and_its_change_land_in_one_slot_in_every_group(cluster_store):
    """A write touches the member's keys, its idempotency key and its group's stream in
    one script: on a Cluster that is one slot, or Redis refuses it (CROSSSLOT)."""
    store = cluster_store
    for group, cid in _one_member_per_group(store, "slot").items():
        record = OptInRecord(cid, "accepted", BASE, f"r-{cid}")
        assert store.set(record, idempotency_key="k") == record
        stream = store._feed_keys(group)[0]
        node = store.client.get_node_from_key(stream)
        assert node.name == store.client.get_node_from_key(store.key(cid)).name
        on_node = store.client.get_redis_connection(node)
        [(_, fields)] = on_node.xrange(stream)
        assert fields[b"correlation_id"] == cid.encode()
    assert len(read_all(store)) == GROUPS


@pytest.mark.redis_server
def test_cluster_a_change_committed_after_a_greater_id_was_read_is_read_once(cluster_store):
    """Stream ids come from each master's clock, so a change can commit in one group with
    a smaller id than a change of another group a reader already has. The cursor keeps a
    position per group: the reader gets it next, once; a full read puts it in id order."""
    store = cluster_store
    members = _one_member_per_group(store, "late")
    a, b = members[0], members[1]
    first = OptInRecord(a, "accepted", BASE, "ra")
    store.set(first)
    time.sleep(0.005)
    second = OptInRecord(b, "accepted", BASE, "rb")
    store.set(second)
    page = store.changes(None, 10)
    assert _entries(page.changes) == [(first, None, 1), (second, None, 1)]
    # Group 0's master commits a change stamped before b's (its clock is behind).
    stream_a = store._feed_keys(0)[0]
    [(id_a, _)] = store.client.xrange(stream_a)
    [(id_b, _)] = store.client.xrange(store._feed_keys(1)[0])
    late_us = int(id_b.split(b"-")[0]) - 1
    assert late_us > int(id_a.split(b"-")[0])
    late = OptInRecord(a, "declined", BASE + US, "ra2", "sms", "crm")
    fields = {
        "correlation_id": a,
        "us": late.updated_at_us,
        "status": "declined",
        "previous": "accepted",
        "request_id": "ra2",
        "source": "sms",
        "client": "crm",
        "version": 2,
    }
    store.client.xadd(stream_a, fields, id=f"{late_us}-0")

    tail = store.changes(page.next, 10)
    assert _entries(tail.changes) == [(late, "accepted", 2)]
    assert store.changes(tail.next, 10).changes == []
    one_by_one = []
    after = None
    while step := store.changes(after, 1).changes:
        one_by_one += step
        after = step[0].cursor
    assert _entries(one_by_one) == [(first, None, 1), (late, "accepted", 2), (second, None, 1)]
    assert one_by_one == read_all(store)


@pytest.mark.redis_server
def test_cluster_a_reader_tailing_writers_across_groups_sees_each_change_once(cluster_store):
    """Writers on members in every group while a reader tails: each change once, each
    member's in commit order, the same changes as a full read afterwards."""
    store = cluster_store
    members = list(_one_member_per_group(store, "tail").values())
    members += [f"more-{i}" for i in range(64)]
    tailed, full, while_writing = tail_while_writing(store, members, writers=6, limit=7)
    assert while_writing > 0
    assert len(full) > 64
    assert_each_change_once_in_member_order(store, tailed, full)
    assert len({c.event.correlation_id for c in full} & set(members[:GROUPS])) > GROUPS // 2
