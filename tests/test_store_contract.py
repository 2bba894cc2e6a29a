"""The store contract on every built-in backend, then what each backend adds to it."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import fakeredis
import pytest
import redis

import backends.memory
import backends.redis.store
import backends.sqlite.sql
from backends.memory import MemoryStore
from backends.postgres import PostgresStore
from backends.redis import RedisStore
from backends.sqlite import SQLiteStore
from optin_service.storage import (
    IDEMPOTENCY_TTL,
    IdempotencyKeyReused,
    OptInRecord,
    StorageError,
    StorageUnavailable,
)
from optin_service.testing import StoreContract
from tests.redis_feed import redis_cursor_past_the_end
from tests.servers import RedisProcess, RedisServer, free_port

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)


#: The Redis stores' import batch here (memory and SQLite: 13): small, so that the
#: contract's bulk tests cross pipeline boundaries.
SMALL_IMPORT_BATCH = 3


def _memory(request, tmp_path):
    return MemoryStore.from_url("memory://", import_batch=13)


def _sqlite(request, tmp_path):
    # Small import batches: the contract's bulk tests cross every chunk boundary.
    return SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db", import_batch=13)


def _fakeredis(request, tmp_path, import_batch=SMALL_IMPORT_BATCH):
    # A FakeServer of its own: FakeRedis() instances otherwise share one by default.
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return RedisStore(client, import_batch=import_batch)


def _redis(request, tmp_path, import_batch=SMALL_IMPORT_BATCH):
    server = request.getfixturevalue("redis_server")
    url = f"{server.url}?prefix=t-{uuid.uuid4().hex}:&import_batch={import_batch}"
    return RedisStore.from_url(url)


def _postgres(request, tmp_path):
    # Small import batches: the contract crosses every batch boundary.
    return PostgresStore(request.getfixturevalue("postgres_url"), import_batch=7)


def _dispose(store):
    store.close()
    if isinstance(store, RedisStore):
        if not isinstance(store.client, fakeredis.FakeRedis):
            keys = list(store.client.scan_iter(match=f"{store.prefix}*"))
            if keys:
                store.client.delete(*keys)
        store.client.close()


_REDIS_PARAMS = [
    pytest.param(_fakeredis, id="fakeredis"),
    pytest.param(_redis, id="redis", marks=pytest.mark.redis_server),
]


_POSTGRES_PARAM = pytest.param(
    _postgres, id="postgres", marks=[pytest.mark.postgres_server, pytest.mark.slow]
)


@pytest.fixture(
    params=[
        pytest.param(_memory, id="memory"),
        pytest.param(_sqlite, id="sqlite"),
        *_REDIS_PARAMS,
        _POSTGRES_PARAM,
    ]
)
def store(request, tmp_path):
    """A fresh, empty store on each backend; closed (and its Redis keys removed) afterwards."""
    store = request.param(request, tmp_path)
    yield store
    _dispose(store)


@pytest.fixture(params=_REDIS_PARAMS)
def redis_store(request, tmp_path):
    """A fresh, empty RedisStore on fakeredis and on a real redis-server."""
    store = request.param(request, tmp_path)
    yield store
    _dispose(store)


class TestStoreContract(StoreContract):
    @pytest.fixture(autouse=True)
    def _small_scan_pages(self, monkeypatch):
        """Import batches are small in every store fixture; Redis SCAN pages of 2 keys
        here, so the contract crosses every boundary (script calls within one
        pipeline: test_redis_import_crosses_script_calls_and_pipelines)."""
        monkeypatch.setattr(backends.redis.store, "SCAN_PAGE", 2)

    def cursor_past_the_end(self, store, cursor):
        if isinstance(store, RedisStore):
            return redis_cursor_past_the_end(cursor)
        return super().cursor_past_the_end(store, cursor)


# --- memory ----------------------------------------------------------------------


def test_memory_from_url_gives_independent_stores():
    one, two = MemoryStore.from_url("memory://"), MemoryStore.from_url("memory://")
    one.set(OptInRecord("member-1", "accepted", STAMP))
    assert two.get("member-1") is None
    assert one.get("member-1") is not None


def test_memory_forgets_idempotency_keys_past_their_ttl(monkeypatch):
    """They were kept forever: memory grew with every distinct key."""
    store = MemoryStore()
    clock = [datetime(2026, 11, 26, tzinfo=timezone.utc)]
    monkeypatch.setattr(backends.memory, "_now", lambda: clock[0])
    for i in range(3):
        record = OptInRecord(f"member-{i}", "accepted", STAMP, request_id=f"r{i}")
        store.set(record, idempotency_key=f"k{i}")
    clock[0] += IDEMPOTENCY_TTL + timedelta(seconds=1)
    store.set(OptInRecord("member-9", "declined", STAMP, request_id="r9"), idempotency_key="k9")
    assert list(store._keys) == [("member-9", "k9")]
    # An expired key is a new request: it records again, under the same key.
    store.set(OptInRecord("member-0", "declined", STAMP, request_id="r10"), idempotency_key="k0")
    assert store.get("member-0").request_id == "r10"


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


@pytest.mark.parametrize(
    ("folder", "query"),
    [("sub", ""), ("C#", "?synchronous=NORMAL")],  # a "#" is part of the path, not a fragment
)
def test_sqlite_absolute_path(tmp_path, folder, query):
    path = tmp_path / folder / "abs.db"
    path.parent.mkdir()
    url = f"sqlite:///{path}{query}"
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
        "sqlite:optin.db",  # was the file "ptin.db"
        "sqlite:/tmp/optin.db",  # was "tmp/optin.db" under the working directory
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
        later = OptInRecord("parent", "declined", STAMP + timedelta(seconds=1))
        store.set(later)
        assert store.get("parent") == later
        assert store.count_events() == 3
    finally:
        store.close()


@pytest.fixture
def sqlite_store(sqlite_url):
    store = SQLiteStore.from_url(sqlite_url)
    yield store
    store.close()


def _break_apply_current(monkeypatch, store, tmp_path):
    # The second statement of a write (the current state) becomes invalid SQL,
    # in a single write and in a bulk import.
    for name in ("APPLY_CURRENT", "CHUNK_CURRENT", "CHUNK_CURRENT_STORED"):
        monkeypatch.setattr(backends.sqlite.sql, name, "UPDATE optin SET nonsense")


def _drop_current_table(monkeypatch, store, tmp_path):
    # The current-state table vanishes under the store: its write fails.
    store.get("anyone")  # open the store's connection first
    raw = sqlite3.connect(tmp_path / "optin.db")
    try:
        raw.execute("DROP TABLE optin")
        raw.commit()
    finally:
        raw.close()


@pytest.mark.parametrize("breakage", [_break_apply_current, _drop_current_table])
def test_sqlite_a_write_failing_halfway_stores_no_event(
    breakage, sqlite_store, monkeypatch, tmp_path
):
    store = sqlite_store
    first = OptInRecord("member-1", "accepted", STAMP, "r1")
    store.set(first)
    breakage(monkeypatch, store, tmp_path)
    newer = OptInRecord("member-1", "declined", STAMP + timedelta(seconds=1), "r2")
    with pytest.raises(StorageError):
        store.set(newer, idempotency_key="key-1")
    with pytest.raises(StorageError):
        store.set(OptInRecord("member-2", "declined", STAMP, "r3"))
    with pytest.raises(StorageError):
        store.import_events([newer, OptInRecord("member-3", "accepted", STAMP, "r4")])
    assert store.history("member-1", 10) == [first]
    assert store.history("member-2", 10) == []
    assert store.history("member-3", 10) == []
    assert store.count_events() == 1
    assert list(store.events()) == [first]
    # Nor was the idempotency key kept: once repaired, the key is free for another answer.
    monkeypatch.undo()
    store.close()  # reopening recreates a dropped table
    other = OptInRecord("member-1", "accepted", STAMP + timedelta(seconds=2), "r5")
    assert store.set(other, idempotency_key="key-1") == other
    assert store.count_events() == 2


def test_sqlite_an_import_stopped_halfway_leaves_no_transaction_open(sqlite_store):
    store = sqlite_store
    good = OptInRecord("member-1", "accepted", STAMP, "r1").row
    too_late = ("member-2", 2**63, "r2", "accepted", "API", "")  # no SQLite integer holds it
    with pytest.raises(OverflowError):
        store.import_rows([good, too_late])
    assert not store._connection().in_transaction
    later = OptInRecord("member-3", "declined", STAMP, "r3")
    assert store.set(later) == later
    assert store.import_rows([good]) == 1
    assert sorted(store.rows()) == sorted([good, later.row])


def test_sqlite_a_refused_or_replayed_key_writes_nothing(sqlite_store, tmp_path):
    store = sqlite_store
    first = OptInRecord("member-1", "accepted", STAMP, "r1")
    store.set(first, idempotency_key="key-1")
    store.close()
    raw = sqlite3.connect(tmp_path / "optin.db")
    try:
        tables = ("optin", "optin_event", "optin_idempotency")

        def dump():
            return {t: raw.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}

        before = dump()
        assert len(before["optin_idempotency"]) == 1
        with pytest.raises(IdempotencyKeyReused):
            store.set(OptInRecord("member-1", "declined", STAMP, "r2"), idempotency_key="key-1")
        assert store.set(OptInRecord("member-1", "accepted", STAMP, "r3"), idempotency_key="key-1")
        assert dump() == before
    finally:
        raw.close()


# --- sqlite: its folder, the file it is bound to, lock waits, readiness ------------


def test_sqlite_a_folder_that_does_not_exist_is_refused_naming_the_path(tmp_path):
    path = tmp_path / "nonexistent" / "dir" / "x.db"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SQLiteStore.from_url(f"sqlite:///{path}")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def db_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def _operations(store):
    """Every kind of call a store answers, each to be tried on a broken store."""
    return {
        "set": lambda: store.set(OptInRecord("member-2", "declined", STAMP, "r2")),
        "set with key": lambda: store.set(
            OptInRecord("member-3", "declined", STAMP, "r3"), idempotency_key="k"
        ),
        "get": lambda: store.get("member-1"),
        "history": lambda: store.history("member-1", 10),
        "count_events": store.count_events,
        "events": lambda: list(store.events()),
        "import_rows": lambda: store.import_rows([OptInRecord("m-4", "accepted", STAMP).row]),
        "check": store.check,
    }


def _assert_every_operation_unavailable(store):
    for name, call in _operations(store).items():
        with pytest.raises(StorageUnavailable):
            call()
            pytest.fail(f"{name} answered although the store's file is gone")


def test_sqlite_folder_removed_under_the_store_answers_unavailable_and_creates_nothing(
    db_folder,
):
    url = f"sqlite:///{db_folder}/optin.db"
    used = SQLiteStore.from_url(url)  # holds a connection to the file
    used.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
    idle = SQLiteStore.from_url(url)  # built while the file existed, never connected
    threads = SQLiteStore.from_url(url)
    try:
        threads.get("member-1")  # this thread's connection; another thread opens its own
        shutil.rmtree(db_folder)
        for store in (used, idle):
            _assert_every_operation_unavailable(store)
        failures = []
        other = threading.Thread(target=lambda: failures.append(_raises(threads.check)))
        other.start()
        other.join(10)
        assert failures == [True]
        assert not db_folder.exists()  # nothing recreated the folder or a database in it
    finally:
        for store in (used, idle, threads):
            store.close()


def _raises(call) -> bool:
    try:
        call()
    except StorageUnavailable:
        return True
    return False


def test_sqlite_a_replaced_file_is_refused_until_the_original_is_back(db_folder, tmp_path):
    path = db_folder / "optin.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}")
    try:
        first = OptInRecord("member-1", "accepted", STAMP, "r1")
        store.set(first)
        moved = tmp_path / "moved"
        db_folder.rename(moved)
        db_folder.mkdir()
        sqlite3.connect(path).close()  # an empty database at the same path
        _assert_every_operation_unavailable(store)
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("SELECT name FROM sqlite_master").fetchall() == []
        finally:
            raw.close()
        # The operator puts the original back: the store answers from it again.
        shutil.rmtree(db_folder)
        moved.rename(db_folder)
        assert store.get("member-1") == first
        store.check()
    finally:
        store.close()


def test_sqlite_a_deleted_wal_file_stops_writes_being_acknowledged(db_folder):
    """`rm optin.db-wal` under a running service: commits went on into the deleted
    file, each answered 200, all lost at the restart. A connection opened before the
    deletion that had not written yet commits there too: refused as well."""
    path = db_folder / "optin.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}")
    idle = SQLiteStore.from_url(f"sqlite:///{path}")  # another worker, connected, no write yet
    try:
        store.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
        assert idle.get("member-1") is not None
        os.remove(f"{path}-wal")
        for writer in (store, idle):
            with pytest.raises(StorageUnavailable, match="-wal") as info:
                writer.set(OptInRecord("member-2", "declined", STAMP, "r2"))
            assert "-wal file was deleted" in info.value.reason
            with pytest.raises(StorageUnavailable):
                writer.check()
    finally:
        store.close()
        idle.close()


def test_sqlite_a_write_whose_file_vanishes_before_commit_is_not_acknowledged(db_folder):
    store = SQLiteStore.from_url(f"sqlite:///{db_folder}/optin.db")
    try:
        store.check()
        conn = store._connection()

        def unlink_at_commit(statement: str) -> None:
            if statement == "COMMIT":
                for name in os.listdir(db_folder):
                    os.unlink(db_folder / name)

        conn.set_trace_callback(unlink_at_commit)
        # The COMMIT itself succeeds, into the unlinked file: the write must not be answered.
        with pytest.raises(StorageUnavailable):
            store.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
        conn.set_trace_callback(None)
        assert os.listdir(db_folder) == []
    finally:
        store.close()


def test_sqlite_a_held_lock_gives_up_within_the_timeout_not_twice_it(db_folder):
    path = db_folder / "optin.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}?timeout=2")
    store.set(OptInRecord("member-0", "accepted", STAMP, "r0"))  # creates the file and queue
    # Another writer, as a worker of another process holds them: the queue, then the lock.
    queue = os.open(f"{path}-lock", os.O_RDWR)
    fcntl.flock(queue, fcntl.LOCK_EX)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
        waited = time.monotonic() - started
        assert 1.5 < waited < 3.0, f"gave up after {waited:.2f}s with timeout=2"
        assert store.max_wait == 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        os.close(queue)
        store.close()


def test_sqlite_a_threads_first_connection_opens_within_the_writes_deadline(db_folder):
    path = db_folder / "optin.db"
    holder = sqlite3.connect(path, isolation_level=None)  # a database not in WAL yet,
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN EXCLUSIVE")  # locked by another program: opening waits for it
    store = SQLiteStore.from_url(f"sqlite:///{path}?timeout=2")
    store._write_lock.acquire()  # and another thread of this process is mid-write
    threading.Timer(1.5, store._write_lock.release).start()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
        waited = time.monotonic() - started
        assert 1.5 < waited < 3.0, f"gave up after {waited:.2f}s with timeout=2"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()


def _read_only(monkeypatch, store, path):
    # SQLite opens a file it may not write read-only. Root may write any file whatever
    # its mode, so the store's connection is opened read-only the way SQLite falls back.
    connect = sqlite3.connect
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    monkeypatch.setattr(sqlite3, "connect", lambda _path, **kw: connect(uri, uri=True, **kw))
    store.close()


def _locked(monkeypatch, store, path):
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _vanished(monkeypatch, store, path):
    shutil.rmtree(path.parent)


@pytest.mark.parametrize("breakage", [_read_only, _locked, _vanished])
def test_sqlite_check_fails_while_the_store_cannot_write(breakage, db_folder, monkeypatch):
    path = db_folder / "optin.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}?timeout=0.5")
    held = None
    try:
        store.set(OptInRecord("member-1", "accepted", STAMP, "r1"))
        store.check()
        held = breakage(monkeypatch, store, path)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.check()
        assert time.monotonic() - started < 3.0
        with pytest.raises(StorageUnavailable):
            store.set(OptInRecord("member-2", "declined", STAMP, "r2"))
    finally:
        if held is not None:
            held.close()
        store.close()


# --- redis -----------------------------------------------------------------------


@pytest.fixture
def raw_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _member_keys(raw, prefix, cid):
    return list(raw.scan_iter(match=f"{prefix}{{{cid}}}*"))


@pytest.mark.redis_server
def test_redis_default_key_layout_is_prefix_and_hash_tag(redis_server, raw_redis):
    cid = f"member-{uuid.uuid4().hex}"
    key = f"optin:{{{cid}}}"
    store = RedisStore.from_url(redis_server.url)
    try:
        record = OptInRecord(cid, "accepted", STAMP, "req:1", "sms")
        assert store.set(record, idempotency_key="key 1") == record
        us = record.updated_at_us
        # The state is µs then 0 (accepted) or 1 (declined): digits, so Redis keeps
        # an integer, not a string (bench/storage.py: bytes per member).
        assert raw_redis.get(key) == f"{us}0".encode()
        assert raw_redis.object("encoding", key) == b"int"
        assert raw_redis.zrange(f"{key}:h", 0, -1, withscores=True) == [
            (b"req:1 accepted sms", float(us))
        ]
        assert raw_redis.get(f"{key}:i:key 1") == b"accepted|sms"
        assert 86_400 - 10 <= raw_redis.ttl(f"{key}:i:key 1") <= 86_400
        assert raw_redis.ttl(key) == -1  # the current state and history never expire
        assert raw_redis.ttl(f"{key}:h") == -1
        assert sorted(_member_keys(raw_redis, "optin:", cid)) == sorted(
            k.encode() for k in (key, f"{key}:h", f"{key}:i:key 1")
        )
        assert store.get(cid) == record
        assert store.history(cid, 10) == [record]
    finally:
        raw_redis.delete(key, f"{key}:h", f"{key}:i:key 1")
        store.close()


@pytest.mark.redis_server
def test_redis_an_older_event_changes_only_the_history_key(redis_server, raw_redis):
    store = RedisStore.from_url(f"{redis_server.url}?prefix=t-{uuid.uuid4().hex}:")
    key = store.key("member-1")
    try:
        newer = OptInRecord("member-1", "declined", STAMP + timedelta(seconds=1), "r2")
        older = OptInRecord("member-1", "accepted", STAMP, "r1", "web")
        store.set(newer)
        store.set(older)
        assert raw_redis.get(key) == f"{newer.updated_at_us}1".encode()
        assert raw_redis.zrange(f"{key}:h", 0, -1, withscores=True) == [
            (b"r1 accepted web", float(older.updated_at_us)),
            (b"r2 declined API", float(newer.updated_at_us)),
        ]
    finally:
        raw_redis.delete(key, f"{key}:h")
        store.close()


@pytest.mark.redis_server
def test_redis_prefix_option_changes_the_key(redis_server, raw_redis):
    cid = f"member-{uuid.uuid4().hex}"
    store = RedisStore.from_url(f"{redis_server.url}?prefix=x:")
    try:
        store.set(OptInRecord(cid, "declined", STAMP), idempotency_key="k")
        assert raw_redis.exists(f"x:{{{cid}}}", f"x:{{{cid}}}:h", f"x:{{{cid}}}:i:k") == 3
        assert _member_keys(raw_redis, "optin:", cid) == []
        assert store.count_events() >= 1
        assert [e for e in store.events() if e.correlation_id == cid] == [store.get(cid)]
    finally:
        raw_redis.delete(f"x:{{{cid}}}", f"x:{{{cid}}}:h", f"x:{{{cid}}}:i:k")
        store.close()


@pytest.mark.redis_server
@pytest.mark.parametrize(
    ("prefix", "neighbour"),
    [
        ("opt-ïn:", "opt-in:"),  # not ASCII: more bytes in the key than letters
        ("t?:", "tX:"),  # glob characters: read as a pattern they match the neighbour...
        ("a*b:", "aXb:"),
        ("t[1]:", "t1:"),  # ...and miss the store's own keys
        ("b\\s:", "bs:"),
    ],
)
def test_redis_export_reads_exactly_its_prefix(redis_server, prefix, neighbour):
    """events() and count_events() (export, migrate) find every member under the
    prefix, with its id whole, and none of a store whose prefix the first matches
    as a glob pattern."""
    tag = uuid.uuid4().hex[:8]
    ours = RedisStore.from_url(f"{redis_server.url}?{urlencode({'prefix': tag + prefix})}")
    other = RedisStore.from_url(f"{redis_server.url}?{urlencode({'prefix': tag + neighbour})}")
    try:
        assert ours.prefix == tag + prefix
        ours.set(OptInRecord("member-1", "accepted", STAMP))
        other.set(OptInRecord("member-2", "declined", STAMP))
        assert [e.correlation_id for e in ours.events()] == ["member-1"]
        assert ours.count_events() == 1
        assert [e.correlation_id for e in other.events()] == ["member-2"]
    finally:
        for store, cid in ((ours, "member-1"), (other, "member-2")):
            store.client.delete(store.key(cid), store.key(cid) + ":h")
            store.close()


def _spy_commands(monkeypatch, client):
    """Record the name of every command ``client`` sends (not through a pipeline)."""
    sent = []
    real = client.execute_command

    def spy(*args, **options):
        sent.append(args[0].upper() if isinstance(args[0], str) else args[0])
        return real(*args, **options)

    monkeypatch.setattr(client, "execute_command", spy)
    return sent


def test_redis_every_set_is_one_script_call(redis_store, monkeypatch):
    # The eviction policy is read once, then trusted for POLICY_RECHECK_SECONDS.
    monkeypatch.setattr(backends.redis.store, "POLICY_RECHECK_SECONDS", 3600)
    store = redis_store
    store.set(OptInRecord("warm-up", "accepted", STAMP))  # loads the script
    sent = _spy_commands(monkeypatch, store.client)
    writes = [
        lambda: store.set(OptInRecord("member-1", "accepted", STAMP, "r1")),
        lambda: store.set(OptInRecord("member-1", "declined", STAMP, "r2")),
        lambda: store.set(OptInRecord("member-1", "accepted", STAMP - timedelta(1), "r0")),
        lambda: store.set(OptInRecord("member-2", "accepted", STAMP, "r3"), idempotency_key="k"),
        lambda: store.set(OptInRecord("member-2", "accepted", STAMP, "r4"), idempotency_key="k"),
    ]
    for write in writes:
        sent.clear()
        write()
        assert sent == ["EVALSHA"]
    sent.clear()
    with pytest.raises(IdempotencyKeyReused):
        store.set(OptInRecord("member-2", "declined", STAMP, "r5"), idempotency_key="k")
    assert sent == ["EVALSHA"]
    assert store.count_events() == 5


@pytest.mark.redis_server
def test_redis_every_set_is_one_script_call_on_the_server(redis_server, raw_redis, monkeypatch):
    """What the server itself sees (MONITOR) while the store writes: one EVALSHA per set
    (the warm-up reads the eviction policy, trusted for the rest of the test)."""
    monkeypatch.setattr(backends.redis.store, "POLICY_RECHECK_SECONDS", 3600)
    store = RedisStore.from_url(f"{redis_server.url}?prefix=t-{uuid.uuid4().hex}:")
    store.set(OptInRecord("warm-up", "accepted", STAMP))
    try:
        with raw_redis.monitor() as monitor:
            store.set(OptInRecord("member-1", "accepted", STAMP, "r1"), idempotency_key="k")
            store.set(OptInRecord("member-1", "declined", STAMP, "r2"))
            store.client.ping()  # a marker: everything before it was the two writes
            commands = []
            for entry in monitor.listen():
                command = entry["command"].split(" ", 1)[0].upper()
                if command == "PING":
                    break
                if entry["client_type"] != "lua":
                    commands.append(command)
        assert commands == ["EVALSHA", "EVALSHA"]
    finally:
        keys = list(raw_redis.scan_iter(match=f"{store.prefix}*"))
        raw_redis.delete(*keys)
        store.close()


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda raw, key: raw.rpush(key, "a list"), id="wrong-type"),
        pytest.param(lambda raw, key: raw.set(key, "unparsable"), id="unparsable"),
        pytest.param(lambda raw, key: raw.set(key, "17672256000000002"), id="bad-status-digit"),
    ],
)
def test_redis_a_write_failing_halfway_stores_no_event(redis_store, corrupt):
    # The script's later step (reading the current state) fails: the event must
    # not have been added to the history before it (both or neither).
    store = redis_store
    corrupt(store.client, store.key("member-1"))
    with pytest.raises(StorageError):
        store.set(OptInRecord("member-1", "accepted", STAMP, "r1"), idempotency_key="k")
    assert store.client.exists(store.key("member-1") + ":h") == 0
    assert store.client.exists(store.key("member-1") + ":i:k") == 0
    assert store.count_events() == 0


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


def test_redis_export_with_no_prefix_skips_a_braced_prefixs_keys():
    server = fakeredis.FakeServer()
    ours = RedisStore(fakeredis.FakeRedis(server=server), prefix="")
    other = RedisStore(fakeredis.FakeRedis(server=server), prefix="{x}:")
    ours.set(OptInRecord("member-1", "accepted", STAMP))
    other.set(OptInRecord("member-2", "declined", STAMP))  # key "{x}:{member-2}:h"
    assert [e.correlation_id for e in ours.events()] == ["member-1"]
    assert ours.count_events() == 1


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?prefix=a:&prefix=b:",
        "redis+sentinel://127.0.0.1:1/mymaster?prefix=a:&prefix=b:",
        "redis+cluster://127.0.0.1:1?wait_timeout_ms=5&wait_timeout_ms=9",
    ],
)
def test_redis_option_given_twice_refuses_to_start(url):
    """Which one wins differed by scheme (first on redis://, last on the others)."""
    with pytest.raises(ValueError, match="given twice"):
        RedisStore.from_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:1/tenant2", "database is /<number>, not /tenant2"),  # was db 0
        ("redis://127.0.0.1:1/1/2", "database is /<number>, not /1/2"),  # was db 12
        ("rediss://127.0.0.1:1/x", "database is /<number>, not /x"),
        ("redis://127.0.0.1:1/0?prefx=a:", "option is unknown"),  # was a 500 per request
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe", "option is refused"),  # a traceback
    ],
)
def test_redis_url_mistakes_refuse_to_start(url, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RedisStore.from_url(url)


@pytest.mark.parametrize(("path", "db"), [("", None), ("/", None), ("/3", 3), ("/3/", 3)])
def test_redis_url_database_forms_that_start(path, db):
    store = RedisStore.from_url(f"redis://127.0.0.1:1{path}")
    assert store.client.connection_pool.connection_kwargs.get("db") == db
    store.close()


@pytest.mark.redis_server
def test_redis_unix_socket_url_reaches_its_database(tmp_path):
    socket_path = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "server").start("--unixsocket", str(socket_path))
    store = RedisStore.from_url(f"unix://{socket_path}?db=2&prefix=u:")
    try:
        store.set(OptInRecord("member-1", "accepted", STAMP))
        raw = redis.Redis(unix_socket_path=str(socket_path), db=2)
        assert raw.exists("u:{member-1}") == 1
        raw.close()
    finally:
        store.close()
        server.stop()


_SPIN_2_SECONDS = """
local stop = tonumber(redis.call('TIME')[1]) + 2
while tonumber(redis.call('TIME')[1]) < stop do end
"""


@pytest.mark.redis_server
@pytest.mark.parametrize("refusal", ["min-replicas", "busy-script", "out-of-memory"])
def test_redis_refusing_for_now_is_unavailable(tmp_path, refusal):
    """NOREPLICAS, BUSY and OOM replies are a 503 (retry later), not a 500, in a single
    write and in a bulk import (a pipeline, whose errors redis-py words differently)."""
    server = RedisServer(tmp_path / "server").start()  # its own: the test changes its config
    raw = redis.Redis.from_url(server.url)
    store = RedisStore.from_url(server.url)
    blocker = None
    try:
        if refusal == "min-replicas":
            raw.config_set("min-replicas-to-write", 1)
        elif refusal == "out-of-memory":
            raw.config_set("maxmemory-policy", "noeviction")
            raw.config_set("maxmemory", 1)
        else:
            raw.config_set("busy-reply-threshold", 50)
            spinner = redis.Redis.from_url(server.url)
            blocker = threading.Thread(target=spinner.eval, args=(_SPIN_2_SECONDS, 0))
            blocker.start()
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # until the script holds the server
                try:
                    raw.ping()
                except redis.ResponseError:
                    break
        events = [OptInRecord("member-1", "accepted", STAMP, request_id="r1")]
        with pytest.raises(StorageUnavailable):
            store.set(events[0])
        with pytest.raises(StorageUnavailable):
            store.import_events(events)
    finally:
        if blocker is not None:
            blocker.join()
        store.close()
        raw.close()
        server.stop()


@pytest.mark.parametrize(
    "fields",
    [{"source": ""}, {"source": "call centre"}, {"source": "a\nb"}, {"request_id": "r\n1"}],
)
def test_redis_refuses_an_event_it_could_not_read_back(fields):
    """Such an event was stored, then its member's state read as an error and a
    second import duplicated it; now nothing is written."""
    store = RedisStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    record = OptInRecord("member-1", "accepted", STAMP, **({"request_id": "r1"} | fields))
    with pytest.raises(StorageError, match="cannot store source"):
        store.set(record)
    with pytest.raises(StorageError, match="cannot store source"):
        store.import_events([record])
    assert store.get("member-1") is None
    assert store.count_events() == 0


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


@pytest.mark.slow
@pytest.mark.redis_server
def test_redis_ties_follow_code_points_whatever_the_servers_locale(tmp_path):
    """redis-server collates Lua strings by its locale (strcoll): under en_US "B" sorts
    after "a". Equal times and statuses must still go to the greater request id by
    code point, as on every backend, or a migration would change the current state."""
    locales = tmp_path / "locales"
    locales.mkdir()
    built = subprocess.run(
        ["localedef", "-i", "en_US", "-f", "UTF-8", str(locales / "en_US.UTF-8")],
        capture_output=True,
        text=True,
    )
    if not (locales / "en_US.UTF-8" / "LC_COLLATE").exists():
        pytest.skip(f"localedef cannot build en_US.UTF-8 here: {built.stderr.strip()}")
    server = RedisProcess(
        tmp_path / "redis",
        ["--save", "", "--appendonly", "no"],
        env={"LOCPATH": str(locales), "LC_ALL": "en_US.UTF-8"},
    ).start()
    store = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        for cid, order in (("upper-first", ("B", "a")), ("lower-first", ("a", "B"))):
            records = {rid: OptInRecord(cid, "accepted", STAMP, rid, f"S{rid}") for rid in order}
            for rid in order:
                store.set(records[rid])
            assert store.get(cid) == records["a"], cid  # "a" (0x61) > "B" (0x42)
            reference = MemoryStore()
            reference.import_events(records.values())
            assert store.get(cid) == reference.get(cid)
    finally:
        store.close()
        server.stop()


def test_redis_refuses_a_row_whose_time_a_score_would_round(redis_store):
    """Rows skip OptInRecord's range check; a time beyond 2**53 µs would come back
    rounded from the sorted set, so it is refused, and the edge itself is exact."""
    store = redis_store
    edge = ("member-1", 2**53, "r1", "accepted", "API", "")
    beyond = ("member-2", 2**53 + 1, "r2", "accepted", "API", "")
    with pytest.raises(StorageError, match="cannot be scored exactly"):
        store.import_rows([beyond])
    assert store.count_events() == 0
    assert store.import_rows([edge, (*edge[:2], "r0", *edge[3:])]) == 2
    assert sorted(store.rows()) == sorted([edge, (*edge[:2], "r0", *edge[3:])])
    assert store.get("member-1").request_id == "r1"


@pytest.fixture(params=_REDIS_PARAMS)
def redis_store_of_batch_120(request, tmp_path):
    """A fresh RedisStore importing 120 events per pipeline, in script calls of 100."""
    store = request.param(request, tmp_path, 120)
    yield store
    _dispose(store)


def test_redis_import_crosses_script_calls_and_pipelines(redis_store_of_batch_120, monkeypatch):
    """250 events with import_batch=120: pipelines of 120, 120 and 10 events, the first
    two in script calls of 100 and 20. Every event lands as one at a time would."""
    store = redis_store_of_batch_120
    pipelines = []
    real = store.client.pipeline
    monkeypatch.setattr(
        store.client, "pipeline", lambda *a, **k: pipelines.append(1) or real(*a, **k)
    )
    # Few members and times, so events of one member fall into different script
    # calls and pipelines, ties included.
    base = OptInRecord("-", "accepted", STAMP).updated_at_us
    statuses = ("accepted", "declined", "accepted")
    rows = [
        (f"member-{i % 7}", base + i % 5, f"r{i:03}", statuses[i % 3], "API", "")
        for i in range(250)
    ]
    expected = MemoryStore()
    assert expected.import_rows(rows) == 250
    assert store.import_rows(rows) == 250
    assert len(pipelines) == 3
    assert sorted(store.rows()) == sorted(expected.rows())
    for n in range(7):
        assert store.get(f"member-{n}") == expected.get(f"member-{n}")
    assert store.import_rows(reversed(rows)) == 0
