"""The store contract on every built-in backend, then what each backend adds to it."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from datetime import datetime, timezone

import fakeredis
import pytest
import redis

from backends.memory import MemoryStore
from backends.redis import RedisStore
from backends.sqlite import SQLiteStore
from optin_service.storage import OptInRecord, StorageError, StorageUnavailable
from optin_service.testing import StoreContract
from tests.servers import free_port

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _memory(request, tmp_path):
    return MemoryStore.from_url("memory://")


def _sqlite(request, tmp_path):
    return SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db")


def _fakeredis(request, tmp_path):
    # A FakeServer of its own: FakeRedis() instances otherwise share one by default.
    return RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def _redis(request, tmp_path):
    server = request.getfixturevalue("redis_server")
    return RedisStore.from_url(f"{server.url}?prefix=t-{uuid.uuid4().hex}:")


@pytest.fixture(
    params=[
        pytest.param(_memory, id="memory"),
        pytest.param(_sqlite, id="sqlite"),
        pytest.param(_fakeredis, id="fakeredis"),
        pytest.param(_redis, id="redis", marks=pytest.mark.redis_server),
    ]
)
def store(request, tmp_path):
    """A fresh, empty store on each backend; closed (and its Redis keys removed) afterwards."""
    store = request.param(request, tmp_path)
    yield store
    store.close()
    if isinstance(store, RedisStore):
        if not isinstance(store.client, fakeredis.FakeRedis):
            keys = list(store.client.scan_iter(match=f"{store.prefix}*"))
            if keys:
                store.client.delete(*keys)
        store.client.close()


class TestStoreContract(StoreContract):
    pass


# --- memory ----------------------------------------------------------------------


def test_memory_from_url_gives_independent_stores():
    one, two = MemoryStore.from_url("memory://"), MemoryStore.from_url("memory://")
    one.set(OptInRecord("member-1", "accepted", STAMP))
    assert two.get("member-1") is None
    assert one.get("member-1") is not None


# --- sqlite ----------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/optin.db"


def test_sqlite_two_stores_on_one_file_see_each_others_writes(sqlite_url):
    one, two = SQLiteStore.from_url(sqlite_url), SQLiteStore.from_url(sqlite_url)
    try:
        first = OptInRecord("member-1", "accepted", STAMP)
        one.set(first)
        assert two.get("member-1") == first
        second = OptInRecord("member-1", "declined", STAMP.replace(year=2027))
        two.set(second)
        assert one.get("member-1") == second
    finally:
        one.close()
        two.close()


def test_sqlite_data_survives_a_restart(sqlite_url):
    record = OptInRecord("member-1", "declined", STAMP)
    before = SQLiteStore.from_url(sqlite_url)
    before.set(record)
    before.close()
    after = SQLiteStore.from_url(sqlite_url)
    try:
        assert after.get("member-1") == record
    finally:
        after.close()


def test_sqlite_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore.from_url("sqlite:///relative.db")
    try:
        assert store.path == str(tmp_path / "relative.db")
        store.set(OptInRecord("member-1", "accepted", STAMP))
        assert (tmp_path / "relative.db").is_file()
    finally:
        store.close()


def test_sqlite_absolute_path(tmp_path):
    path = tmp_path / "sub" / "abs.db"
    url = f"sqlite:///{path}"
    assert url.startswith("sqlite:////")
    store = SQLiteStore.from_url(url)
    try:
        assert store.path == str(path)
        store.set(OptInRecord("member-1", "accepted", STAMP))
        assert path.is_file()
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "sqlite://host/optin.db",
        "sqlite://localhost/optin.db",
        "sqlite:///optin.db?synchronous=bogus",
        "sqlite:///optin.db?synchronous=",
        "sqlite:///optin.db?journal_mode=delete",
        "sqlite:///optin.db?synchronous=FULL&bogus=1",
        "sqlite:///optin.db?bogus=",
        "sqlite:///optin.db?timeout=soon",
        "sqlite:///optin.db?timeout=",
        "sqlite:///optin.db?timeout=-1",
        "sqlite:///optin.db?timeout=nan",
        "sqlite:///optin.db?timeout=inf",
    ],
)
def test_sqlite_bad_urls_raise_value_error(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
        SQLiteStore.from_url(url)


def test_sqlite_timeout_option_sets_busy_timeout(tmp_path):
    store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db?timeout=0.25")
    try:
        assert store._connection().execute("PRAGMA busy_timeout").fetchone()[0] == 250
    finally:
        store.close()


@pytest.mark.parametrize("value", ["NORMAL", "normal", "FULL", "EXTRA"])
def test_sqlite_synchronous_option_is_accepted(value, tmp_path):
    store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db?synchronous={value}")
    try:
        store.set(OptInRecord("member-1", "accepted", STAMP))
        expected = {"NORMAL": 1, "FULL": 2, "EXTRA": 3}[value.upper()]
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        store.close()


def test_sqlite_pragmas_default_to_wal_and_full(tmp_path, sqlite_url):
    store = SQLiteStore.from_url(sqlite_url)
    try:
        store.set(OptInRecord("member-1", "accepted", STAMP))
        # journal_mode is a property of the file: any new connection sees it.
        fresh = sqlite3.connect(tmp_path / "optin.db")
        try:
            assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            fresh.close()
        # synchronous is per connection: ask the store's own.
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_sqlite_store_used_after_fork_opens_its_own_connection(sqlite_url):
    store = SQLiteStore.from_url(sqlite_url)
    try:
        store.set(OptInRecord("parent", "accepted", STAMP))
        parent_conn = store._connection()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                conn = store._connection()
                if conn is not parent_conn:
                    store.set(OptInRecord("child", "declined", STAMP))
                    if store.get("parent") is not None:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store._connection() is parent_conn
        assert store.get("child") == OptInRecord("child", "declined", STAMP)
        store.set(OptInRecord("parent", "declined", STAMP))
        assert store.get("parent") == OptInRecord("parent", "declined", STAMP)
    finally:
        store.close()


# --- redis -----------------------------------------------------------------------


@pytest.fixture
def raw_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.mark.redis_server
def test_redis_default_key_layout_is_prefix_and_hash_tag(redis_server, raw_redis):
    cid = f"member-{uuid.uuid4().hex}"
    store = RedisStore.from_url(redis_server.url)
    try:
        record = store.set(OptInRecord(cid, "accepted", STAMP))
        assert raw_redis.get(f"optin:{{{cid}}}") == f"accepted:{record.updated_at_us}".encode()
        assert store.get(cid) == record
    finally:
        raw_redis.delete(f"optin:{{{cid}}}")
        store.close()


@pytest.mark.redis_server
def test_redis_prefix_option_changes_the_key(redis_server, raw_redis):
    cid = f"member-{uuid.uuid4().hex}"
    store = RedisStore.from_url(f"{redis_server.url}?prefix=x:")
    try:
        store.set(OptInRecord(cid, "declined", STAMP))
        assert raw_redis.exists(f"x:{{{cid}}}") == 1
        assert raw_redis.exists(f"optin:{{{cid}}}") == 0
    finally:
        raw_redis.delete(f"x:{{{cid}}}")
        store.close()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.set(OptInRecord("member-1", "accepted", STAMP)), id="set"),
        pytest.param(lambda s: s.get("member-1"), id="get"),
        pytest.param(lambda s: s.check(), id="check"),
    ],
)
def test_redis_not_listening_is_unavailable_within_2s(call):
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call(store)
        assert time.monotonic() - started < 2.0
    finally:
        store.close()


@pytest.mark.redis_server
def test_redis_wrongtype_is_a_storage_error_not_unavailable(redis_server, raw_redis):
    store = RedisStore.from_url(f"{redis_server.url}?prefix=t-{uuid.uuid4().hex}:")
    key = store.key("member-1")
    raw_redis.rpush(key, "not a string")
    try:
        with pytest.raises(StorageError) as info:
            store.get("member-1")
        assert not isinstance(info.value, StorageUnavailable)
    finally:
        raw_redis.delete(key)
        store.close()


def test_redis_close_leaves_a_callers_client_open(monkeypatch):
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    closed = []
    monkeypatch.setattr(client, "close", lambda: closed.append(True))
    store = RedisStore(client)
    store.set(OptInRecord("member-1", "accepted", STAMP))
    store.close()
    assert closed == []
    assert store.get("member-1") is not None


def test_redis_close_closes_a_client_it_built(monkeypatch):
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    closed = []
    monkeypatch.setattr(store.client, "close", lambda: closed.append(True))
    store.close()
    assert closed == [True]
