"""What the PostgreSQL store adds to the contract: its URL, its schema, its failure modes.

Tests that change the server (synchronous replication, read-only, stopping it)
start a server of their own; the others share the session's, each in a schema of
its own (``postgres_url``).
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import backends.postgres.schema
import backends.postgres.store
from backends.postgres import PostgresStore
from backends.postgres.schema import VERSION
from backends.sqlite import SQLiteStore
from optin_service.storage import (
    IDEMPOTENCY_TTL,
    IdempotencyKeyReused,
    OptInRecord,
    StorageError,
    StorageUnavailable,
)
from tests.servers import PostgresServer, child_pids, free_port

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def _record(cid: str = "member-1", status: str = "accepted", rid: str = "r1", **kw):
    return OptInRecord(cid, status, kw.pop("at", STAMP), rid, **kw)


@pytest.fixture
def store(postgres_url):
    store = PostgresStore.from_url(postgres_url)
    yield store
    store.close()


@pytest.fixture
def own_server():
    """A server of this test's own, for tests that reconfigure or stop it."""
    server = PostgresServer().start()
    yield server
    server.cleanup()


def _schema_of(url: str) -> str:
    return url.rsplit("search_path%3D", 1)[1]


def _raises(kind: type[Exception], call) -> bool:
    try:
        call()
    except kind:
        return True
    return False


def _until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (a server applies a reload a moment later)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


# --- the URL ---------------------------------------------------------------------------


def test_from_url_does_not_connect():
    store = PostgresStore.from_url(f"postgresql://127.0.0.1:{free_port()}/optin")
    store.close()


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("postgresql://h/db", {}),
        ("postgres://h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=disable", {}),
        (
            "postgresql://u:p@h/db?statement_timeout_ms=800&pool_max_size=3&import_batch=9",
            {"statement_timeout_ms": 800, "pool_max_size": 3, "import_batch": 9},
        ),
        ("postgresql:///db?host=/run/postgresql&pool_min_size=0", {"pool_min_size": 0}),
    ],
)
def test_url_options_are_ours_or_libpqs(url, options):
    store = PostgresStore.from_url(url)
    for name, value in options.items():
        assert getattr(store.options, name) == value


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h/db?bogus=1", 'invalid URI query parameter: "bogus"'),
        ("postgresql://h/db?statement_timeout=5", "statement_timeout"),  # libpq's? no: ours is _ms
        ("postgresql://h/db?sslmode=require&sslmode=disable", "given twice"),
        ("postgresql://h/db?import_batch=1&import_batch=2", "given twice"),
        ("postgresql://h/db?statement_timeout_ms=soon", "not a whole number"),
        ("postgresql://h/db?statement_timeout_ms=0", "statement_timeout_ms must be"),
        ("postgresql://h/db?pool_min_size=5&pool_max_size=2", "below pool_min_size"),
        ("postgresql://h/db?connect_timeout=later", "connect_timeout"),
        ("postgresql://h:port/db", "port 'port' is not a port number"),
        ("postgresql://h1:5432,h2:99999/db", "port '99999' is not a port number"),
        ("postgresql://h/db?sslmode=requir", "sslmode='requir' is not one of"),
        ("postgresql://h:5432/db?host=h1,h2,h3&port=5432,5433", "2 ports for 3 hosts"),
        ("postgresql://h1:5432/db?port=5432,5433", "2 ports for 1 hosts"),
        ("postgresql://h/db?keepalives=maybe", "keepalives='maybe' is not a whole number"),
        ("postgresql://h/db?keepalives_idle=1.5", "keepalives_idle='1.5' is not a whole"),
        ("postgresql://h/db?target_session_attrs=readwrite", "target_session_attrs="),
    ],
)
def test_url_mistakes_refuse_to_start(url, message):
    with pytest.raises(ValueError, match=message):
        PostgresStore.from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret@h/db?bogus=1&password=s3cret",
        # libpq's own messages quote the token they could not read.
        "postgresql://app:s3cret%zz@h/db",
        "postgresql://app@h/db?password=s3cret%zz",
        "postgresql://app:s3cret%00x@h/db",
        "postgresql://app@h/db?sslpassword=s3cret%00",
        "postgresql://app:s3 cret@h/db",
        " postgresql://app:s3cret@h/db",  # not a URI to libpq: it quotes the whole string
        "postgresql:/app:s3cret@h/db",
        # Unencoded "/" and "@": libpq cuts the password there, and the rest went into
        # the port ("port 'ab' is not...") or the host every connection attempt logs.
        "postgresql://app:s3c/ret@h/db",
        "postgresql://app:s3c@ret@h/db",
        "postgresql://app:s3%ffcret@h/db",
    ],
)
def test_url_refusals_hide_the_password(url):
    with pytest.raises(ValueError) as info:
        PostgresStore.from_url(url)
    message = str(info.value)
    for piece in ("s3cret", "s3c", "ret", "cret"):
        assert piece not in message
    assert "***" in message


def test_an_option_in_the_url_and_as_a_keyword_is_refused():
    with pytest.raises(ValueError, match="given twice: import_batch"):
        PostgresStore("postgresql://h/db?import_batch=5", import_batch=6)


def test_the_app_logs_the_url_without_its_password(caplog):
    from optin_service import create_app

    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/db"
    with caplog.at_level("INFO", logger="optin_service"):
        app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    app.extensions["optin"].store.close()
    assert "s3cret" not in caplog.text
    assert "postgresql://app:***@127.0.0.1" in caplog.text


# --- an unreachable server ---------------------------------------------------------------


@pytest.mark.slow  # 8 waits of a second for a connection
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.set(_record()), id="set"),
        pytest.param(lambda s: s.get("member-1"), id="get"),
        pytest.param(lambda s: s.check(), id="check"),
        pytest.param(lambda s: s.history("member-1", 10), id="history"),
    ],
)
def test_not_listening_is_unavailable_within_2s(call):
    port1, port2 = free_port(), free_port()
    store = PostgresStore.from_url(f"postgresql://127.0.0.1:{port1},127.0.0.1:{port2}/optin")
    try:
        for _ in range(2):  # the first attempt and the one after it
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                call(store)
            assert time.monotonic() - started < 2.0
    finally:
        store.close()


# --- the schema ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_first_use_creates_the_tables_at_the_current_version(store, postgres_server, postgres_url):
    schema = _schema_of(postgres_url)
    store.get("member-1")
    tables = postgres_server.execute(
        f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1"
    )
    assert [t for (t,) in tables] == [
        "optin",
        "optin_change",
        "optin_event",
        "optin_feed",
        "optin_health",
        "optin_idempotency",
        "optin_schema_version",
        "optin_state",
    ]
    assert postgres_server.execute(f"SELECT version FROM {schema}.optin_schema_version") == [
        (VERSION,)
    ]
    assert store.upgrade() == (VERSION, VERSION)


@pytest.mark.slow
@pytest.mark.postgres_server
def test_upgrade_creates_an_empty_database_and_is_idempotent(postgres_url):
    store = PostgresStore.from_url(postgres_url)
    try:
        assert store.upgrade() == (0, VERSION)
        assert store.upgrade() == (VERSION, VERSION)
        assert store.set(_record()) == _record()
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_schema_newer_than_this_release_is_unavailable_naming_both_versions(
    store, postgres_server, postgres_url
):
    schema = _schema_of(postgres_url)
    store.upgrade()
    postgres_server.execute(f"UPDATE {schema}.optin_schema_version SET version = {VERSION + 1}")
    other = PostgresStore.from_url(postgres_url)  # a worker of the older release, starting now
    message = f"schema is version {VERSION + 1}, newer than this release knows \\({VERSION}\\)"
    try:
        with pytest.raises(StorageUnavailable, match=message):
            other.get("member-1")
        with pytest.raises(StorageUnavailable, match=message):
            other.set(_record())
        with pytest.raises(StorageUnavailable, match=message):
            other.check()
        with pytest.raises(StorageError, match=message):  # left as it is
            other.upgrade()
        postgres_server.execute(f"UPDATE {schema}.optin_schema_version SET version = {VERSION}")
        assert other.set(_record()) == _record()  # checked again until it matches
    finally:
        other.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_release_with_a_new_migration_waits_for_optin_db_upgrade(
    store, postgres_server, postgres_url, monkeypatch
):
    schema = _schema_of(postgres_url)
    store.set(_record())  # the tables, at this release's version
    later = VERSION + 1
    monkeypatch.setattr(backends.postgres.schema, "VERSION", later)
    monkeypatch.setitem(
        backends.postgres.schema.MIGRATIONS, later, "CREATE TABLE optin_later (x int);"
    )
    newer = PostgresStore.from_url(postgres_url)  # a worker of the newer release
    try:
        with pytest.raises(StorageUnavailable, match=f"needs {later}: run `optin db upgrade`"):
            newer.get("member-1")
        assert store.get("member-1") == _record()  # the running release goes on
        assert newer.upgrade() == (VERSION, later)
        assert newer.get("member-1") == _record()
        assert postgres_server.execute(f"SELECT version FROM {schema}.optin_schema_version") == [
            (later,)
        ]
        assert postgres_server.execute(f"SELECT count(*) FROM {schema}.optin_later") == [(0,)]
    finally:
        newer.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_workers_starting_at_once_create_the_tables_once(postgres_url):
    stores = [PostgresStore.from_url(postgres_url) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    errors = []

    def first_use(store):
        barrier.wait()
        try:
            store.set(_record(rid=f"r{id(store)}"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert stores[0].count_events() == len(stores)
    finally:
        for store in stores:
            store.close()


# --- what the engine must get right ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_ties_follow_code_points_whatever_the_databases_collation(postgres_server):
    """A database whose collation puts "B" after "a" (ICU, en-US) must still give the
    tie to the greater request id by code point, as every backend does."""
    name = "optin_icu"
    postgres_server.execute(
        f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
        "LOCALE 'C.UTF-8'"
    )
    store = PostgresStore.from_url(postgres_server.url(name))
    try:
        assert postgres_server.execute("SELECT 'B' > 'a'", database=name) == [(True,)]
        for cid, order in (("upper-first", ("B", "a")), ("lower-first", ("a", "B"))):
            records = {rid: _record(cid, rid=rid) for rid in order}
            for rid in order:
                store.set(records[rid])
            assert store.get(cid) == records["a"], cid  # "a" (0x61) > "B" (0x42)
            assert store.history(cid, 10) == [records["a"], records["B"]]
        batch = [_record("imported", rid=rid) for rid in ("a", "B", "Z")]
        assert store.import_events(batch) == 3
        assert store.get("imported").request_id == "a"
    finally:
        store.close()
        postgres_server.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.slow
@pytest.mark.postgres_server
def test_history_reads_the_primary_key_index(store, postgres_server, postgres_url):
    schema = _schema_of(postgres_url)
    store.import_events(_record(f"m{i % 50}", rid=f"r{i}", at=STAMP + i * _US) for i in range(5000))
    postgres_server.execute(f"ANALYZE {schema}.optin_event")
    plan = postgres_server.execute(
        f"SET search_path = {schema}",
        "EXPLAIN SELECT * FROM optin_event WHERE correlation_id = 'm1' "
        "AND (updated_us, request_id) < (9000000000000000, 'r') "
        "ORDER BY updated_us DESC, request_id DESC LIMIT 20",
    )
    text = "\n".join(line for (line,) in plan)
    assert "Index Scan Backward using optin_event_pkey" in text, text
    assert "Sort" not in text, text


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_write_failing_halfway_stores_no_event(store, postgres_server, postgres_url):
    schema = _schema_of(postgres_url)
    first = _record()
    store.set(first, idempotency_key="k0")
    postgres_server.execute(f"ALTER TABLE {schema}.optin RENAME TO optin_gone")
    newer = _record(status="declined", rid="r2", at=STAMP + _US)
    with pytest.raises(StorageError):
        store.set(newer, idempotency_key="k1")
    with pytest.raises(StorageError):
        store.import_events([newer, _record("member-3", rid="r4")])
    postgres_server.execute(f"ALTER TABLE {schema}.optin_gone RENAME TO optin")
    assert store.history("member-1", 10) == [first]
    assert store.history("member-3", 10) == []
    # Nor was the key kept: it is free for another answer.
    other = _record(status="declined", rid="r5", at=STAMP + 2 * _US)
    assert store.set(other, idempotency_key="k1") == other
    assert store.count_events() == 2


@pytest.mark.slow
@pytest.mark.postgres_server
def test_an_import_stopped_halfway_leaves_the_batch_out_and_the_store_usable(store):
    good = _record().row
    too_late = ("member-2", 2**63, "r2", "accepted", "API", "")  # no bigint holds it
    with pytest.raises(StorageError):
        store.import_rows([good, too_late])
    assert store.count_events() == 0
    later = _record("member-3", "declined", "r3")
    assert store.set(later) == later
    assert store.import_rows([good]) == 1
    assert sorted(store.rows()) == sorted([good, later.row])


def _open_transactions(server: PostgresServer) -> list[tuple]:
    return server.execute(
        "SELECT state, query FROM pg_stat_activity "
        "WHERE application_name = 'optin-service' AND state LIKE 'idle in transaction%'"
    )


@pytest.mark.slow
@pytest.mark.postgres_server
@pytest.mark.parametrize(
    ("bad", "error", "kept"),
    [
        (("m3", 2**63, "r3", "accepted", "API", ""), StorageError, 0),  # refused by COPY
        (("m3", 3, "r3", "maybe", "API", ""), StorageError, 2),  # refused by chunk 2's merge
        (None, ZeroDivisionError, 0),  # the stream itself fails
    ],
)
def test_an_import_failing_keeps_the_chunks_merged_before_it_and_no_stage(
    postgres_url, postgres_server, bad, error, kept
):
    """Chunks of 2. The whole stream is staged before any merge, so a failure while
    staging (COPY refusing a row, the stream failing) keeps nothing; a chunk whose merge
    fails is rolled back, and the chunks merged before it stay, with their changes. No
    transaction stays open, no temporary table is left, and importing again completes.
    One session, so the chunks are the stream's (the next test shares it between two)."""
    store = PostgresStore(postgres_url, import_batch=2, import_connections=1)
    good = [_record(f"m{i}", rid=f"r{i}").row for i in range(6)]

    def rows():
        yield from good[:3]
        if bad is None:
            raise ZeroDivisionError("the source failed")
        yield bad
        yield from good[3:]

    try:
        with pytest.raises(error):
            store.import_rows(rows())
        assert sorted(store.rows()) == sorted(good[:kept])
        assert [c.event.row for c in store.changes(None, 100).changes] == good[:kept]
        assert _open_transactions(postgres_server) == []
        temporary = "SELECT relname FROM pg_class WHERE relpersistence = 't'"
        assert postgres_server.execute(temporary) == []
        assert store.import_rows(good) == 6 - kept
        assert [c.event.row for c in store.changes(None, 100).changes] == good
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_an_import_shares_members_between_two_sessions_and_stops_both_on_a_failure(
    postgres_url, postgres_server
):
    """Two sessions copy at once (each member's events go to one of them). A merge
    failing in one stops the other after its chunk: each member keeps a prefix of its
    events, oldest first, with its changes; nothing stays open; importing again
    completes, each member's changes numbered 1, 2, 3 in order."""
    store = PostgresStore(postgres_url, import_batch=4, import_connections=2)
    good = [
        _record(f"m{i:02d}", "accepted" if n % 2 else "declined", f"r{n}", at=STAMP + n * _US).row
        for i in range(30)
        for n in range(3)
    ]
    copying = []

    def rows(bad):
        for i, row in enumerate(good):
            if i == len(good) // 2:
                copying.append(
                    postgres_server.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE query LIKE 'COPY optin_staged%' AND state = 'active'"
                    )[0][0]
                )
            yield row
        if bad:
            yield ("m07", good[0][1] + 9, "r9", "maybe", "API", "")  # refused by a merge

    try:
        with pytest.raises(StorageError):
            store.import_rows(rows(bad=True))
        assert copying == [2]
        assert _open_transactions(postgres_server) == []
        temporary = "SELECT relname FROM pg_class WHERE relpersistence = 't'"
        assert postgres_server.execute(temporary) == []
        kept = sorted(store.rows())
        assert len(kept) < len(good)
        for cid in {row[0] for row in kept}:
            mine = [row for row in good if row[0] == cid]
            stored = [row for row in kept if row[0] == cid]
            assert stored == mine[: len(stored)]  # the oldest ones
        assert store.import_rows(rows(bad=False)) == len(good) - len(kept)
        assert sorted(store.rows()) == sorted(good)
        changes = store.changes(None, 1000).changes
        assert len(changes) == len(good)
        for cid in {row[0] for row in good}:
            mine = [(c.event.row, c.version) for c in changes if c.event.correlation_id == cid]
            assert mine == [(row, n + 1) for n, row in enumerate(r for r in good if r[0] == cid)]
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_ctrl_c_during_an_import_stops_every_session_after_its_chunk(postgres_url, postgres_server):
    """A KeyboardInterrupt in the waiting thread went unheard until both sessions had
    merged every chunk (`optin import` then even reported success)."""
    store = PostgresStore(postgres_url, import_batch=10, import_connections=2)
    rows = [_record(f"m{i:05d}", rid=f"r{i}").row for i in range(3000)]
    merging = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE query LIKE '%WITH new AS%' AND pid <> pg_backend_pid()"
    )

    def interrupt_once_merging() -> None:
        _until(lambda: postgres_server.execute(merging)[0][0] > 0, "a merge", timeout=30)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_merging, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            store.import_rows(iter(rows))
        assert 0 < store.count_events() < len(rows)  # stopped early, chunks kept
        assert _open_transactions(postgres_server) == []
        kept = store.count_events()
        assert store.import_rows(iter(rows)) == len(rows) - kept  # running it again completes
        assert store.count_events() == len(rows)
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_export_reads_through_a_server_side_cursor(store, postgres_server):
    store.import_rows(_record(f"m{i}", rid=f"r{i}").row for i in range(25_000))
    rows = store.rows()
    first = next(rows)  # the first FETCH is done; the cursor stays open on the server
    seen = postgres_server.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = 'optin-service' "
        "AND query LIKE 'FETCH%'"
    )
    rest = list(rows)
    assert seen and "optin_export" in seen[0][0], seen
    assert len(rest) + 1 == 25_000 and first not in rest


@pytest.mark.slow
@pytest.mark.postgres_server
def test_import_streams_rows_into_copy(postgres_url, postgres_server):
    """Rows go into COPY as they come, in batches of import_batch: while the 3rd row
    of a batch is read, the server is inside that batch's COPY."""
    store = PostgresStore(postgres_url, import_batch=5)
    during = []

    def rows():
        for i in range(13):
            if i % 5 == 2:
                during.append(
                    postgres_server.execute(
                        "SELECT query FROM pg_stat_activity "
                        "WHERE application_name = 'optin-service' AND state = 'active'"
                    )
                )
            yield _record(f"m{i}", rid=f"r{i}").row

    try:
        assert store.import_rows(rows()) == 13
        assert [q[0][0].startswith("COPY optin_staged") for q in during] == [True] * 3
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_idempotency_window_is_24_hours(store, monkeypatch):
    clock = [1_795_000_000_000_000]
    monkeypatch.setattr(backends.postgres.store, "_now_us", lambda: clock[0])
    first = store.set(_record(), idempotency_key="k")
    clock[0] += IDEMPOTENCY_TTL // _US - 1
    assert store.set(_record(rid="r2", at=STAMP + _US), idempotency_key="k") == first
    with pytest.raises(IdempotencyKeyReused):
        store.set(_record(status="declined", rid="r3"), idempotency_key="k")
    clock[0] += 1  # as old as the window: forgotten, the key starts again with this one
    second = _record(status="declined", rid="r4", at=STAMP + 2 * _US)
    assert store.set(second, idempotency_key="k") == second
    with pytest.raises(IdempotencyKeyReused):
        store.set(_record(rid="r5", at=STAMP + 3 * _US), idempotency_key="k")
    assert store.count_events() == 2


@pytest.mark.slow
@pytest.mark.postgres_server
def test_expired_keys_are_deleted_as_writes_go_on(
    store, postgres_server, postgres_url, monkeypatch
):
    schema = _schema_of(postgres_url)
    clock = [1_795_000_000_000_000]
    monkeypatch.setattr(backends.postgres.store, "_now_us", lambda: clock[0])
    for i in range(30):
        store.set(_record(f"m{i}", rid=f"r{i}"), idempotency_key=f"k{i}")
    clock[0] += IDEMPOTENCY_TTL // _US
    monkeypatch.setattr(backends.postgres.store, "_PRUNE_EVERY", 10)
    for i in range(10):
        store.set(_record("later", rid=f"s{i}", at=STAMP + i * _US))
    assert postgres_server.execute(f"SELECT count(*) FROM {schema}.optin_idempotency") == [(0,)]


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_forked_child_opens_its_own_connections(store):
    store.set(_record("parent"))
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            store.set(_record("child", "declined"))
            if store.get("parent") is not None:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection was not disturbed by the child.
    assert store.get("child") == _record("child", "declined")
    assert store.set(_record("parent", rid="r2", at=STAMP + _US)).request_id == "r2"


# --- failures of a server ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_cancelled_wait_for_a_synchronous_standby_is_unavailable(own_server):
    """The server commits locally, then waits for a standby that is not there; the
    store's deadline cancels the wait and the server answers with a WARNING only: the
    write must not look done. A retry with the key waits again, and is answered once
    the standby is no longer awaited, writing nothing twice."""
    store = PostgresStore.from_url(own_server.url(statement_timeout_ms="500"))
    try:
        store.set(_record("warm-up"))  # the tables exist before replication is required
        own_server.execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuch'")
        own_server.reload()
        # The server applies the setting a moment after the reload: until a write waits.
        _until(lambda: _raises(StorageUnavailable, store.check), "replication required")
        first = _record()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="synchronous replication"):
            store.set(first, idempotency_key="k")
        assert 0.5 <= time.monotonic() - started < 3.0
        with pytest.raises(StorageUnavailable, match="synchronous replication"):
            store.set(_record(rid="r2"), idempotency_key="k")  # the client's retry
        with pytest.raises(StorageUnavailable):
            store.check()
        assert store.get("member-1") == first  # committed here: visible on this server
        own_server.execute("ALTER SYSTEM RESET synchronous_standby_names")
        own_server.reload()
        _until(lambda: not _raises(StorageUnavailable, store.check), "replication not required")
        assert store.set(_record(rid="r3"), idempotency_key="k") == first
        # Its change is part of the write's transaction: in the feed once, retries or not.
        changes = store.changes(None, 10).changes
        assert [(c.event, c.version) for c in changes] == [(_record("warm-up"), 1), (first, 1)]
        assert store.history("member-1", 10) == [first]
        store.check()
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_read_only_server_refuses_writes_and_answers_reads(own_server):
    store = PostgresStore.from_url(own_server.url())
    try:
        first = _record()
        store.set(first)
        own_server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        own_server.reload()
        _until(lambda: _raises(StorageUnavailable, store.check), "read-only")
        for write in (
            lambda: store.set(_record(rid="r2", at=STAMP + _US)),
            lambda: store.set(_record(rid="r3", at=STAMP + _US), idempotency_key="k"),
            lambda: store.import_events([_record("member-2")]),
            store.check,
        ):
            with pytest.raises(StorageUnavailable, match="read-only"):
                write()
        assert store.get("member-1") == first
        assert store.history("member-1", 10) == [first]
        own_server.execute(
            "SET default_transaction_read_only = off",
            "ALTER SYSTEM RESET default_transaction_read_only",
        )
        own_server.reload()
        _until(lambda: not _raises(StorageUnavailable, store.check), "writable")
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_stopped_server_is_unavailable_and_the_store_recovers_by_itself(own_server):
    store = PostgresStore.from_url(own_server.url())
    try:
        store.set(_record())
        own_server.stop()
        for call in (store.check, lambda: store.get("member-1"), lambda: store.set(_record())):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                call()
            assert time.monotonic() - started < 2.0
        own_server.start()
        deadline = time.monotonic() + 8
        while True:
            try:
                store.check()
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "did not recover within 8 s"
                time.sleep(0.1)
        assert store.get("member-1") == _record()
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_after_a_restart_no_request_meets_a_stale_connection(own_server):
    """The pool held 3 connections to the server before it restarted: each is found
    dead as it leaves the pool, and replaced, so every request after the restart is
    served (the first one answered 503 before, in every worker)."""
    store = PostgresStore.from_url(own_server.url(pool_min_size="3"))
    try:
        store.set(_record())
        _until(
            lambda: (
                own_server.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'optin-service'"
                )[0][0]
                >= 3
            ),
            "3 connections open",
        )
        own_server.stop()
        own_server.start()
        store.set(_record(rid="r2", at=STAMP + _US))
        for _ in range(10):
            assert store.get("member-1") == _record(rid="r2", at=STAMP + _US)
    finally:
        store.close()


def test_a_session_the_server_terminated_is_replaced_before_use(store, postgres_server):
    """pg_terminate_backend (an administrator, a failover tool) ends a pooled session:
    the next operation is served on a new connection, not answered 503."""
    store.set(_record())
    ended = postgres_server.execute(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'optin-service' AND pid <> pg_backend_pid()"
    )
    pids = ", ".join(str(pid) for pid, _ in ended)
    gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({pids})"
    _until(lambda: postgres_server.execute(gone)[0][0] == 0, "the sessions ended")
    assert store.get("member-1") == _record()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_server_that_stopped_answering_costs_a_request_its_deadline_not_forever(own_server):
    """SIGSTOP on every server process: connections stay open, nothing answers, the
    server's statement_timeout cannot fire. The request ends at its deadline (cancel,
    then the connection is cut), and the store works again once the server does."""
    store = PostgresStore.from_url(own_server.url(statement_timeout_ms="500"))
    stopped = []
    try:
        store.set(_record())
        stopped = [own_server.pid, *child_pids(own_server.pid)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        outcome = []

        def read() -> None:
            started = time.monotonic()
            try:
                store.get("member-1")
            except Exception as exc:  # checked below
                outcome.append(exc)
            outcome.append(time.monotonic() - started)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(10)  # a hang fails the test instead of holding it
        assert not reader.is_alive(), "the read still hangs after 10 s"
        error, elapsed = outcome
        assert isinstance(error, StorageUnavailable), error
        assert elapsed < 4.0  # deadline 1 s, a cancel 1 s, then cut
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 8
        while True:
            try:
                assert store.get("member-1") == _record()
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "did not recover within 8 s"
                time.sleep(0.1)
    finally:
        store.close()


# --- migrate, row for row -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_migrate_sqlite_to_postgres_and_back_row_for_row(postgres_url, tmp_path):
    source = SQLiteStore(str(tmp_path / "source.db"))
    events = [
        _record(
            f"m{i % 37}",
            ("accepted", "declined")[i % 3 == 0],
            f"r{i}",
            at=STAMP + (i % 11) * _US,
            source=("API", "WEB")[i % 2],
            client=("", "crm")[i % 5 == 0],
        )
        for i in range(1000)
    ]
    source.import_events(events)
    middle = PostgresStore(postgres_url, import_batch=128)
    back = SQLiteStore(str(tmp_path / "back.db"))
    try:
        assert middle.import_rows(source.rows()) == 1000
        assert back.import_rows(middle.rows()) == 1000
        assert sorted(back.rows()) == sorted(source.rows())
        for i in range(37):
            assert back.get(f"m{i}") == source.get(f"m{i}") == middle.get(f"m{i}")
    finally:
        for store in (source, middle, back):
            store.close()


def test_without_psycopg_the_scheme_says_what_to_install():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['psycopg'] = None; "  # as if it were not installed
        "from optin_service.registry import store_from_url\n"
        "try:\n    store_from_url('postgresql://h/db')\n"
        "except LookupError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'optin-service[postgres]'" in out.stdout, out


def test_psycopg_is_loaded_only_for_postgres_urls(tmp_path):
    """The embedded default needs nothing of PostgreSQL's."""
    import subprocess
    import sys

    code = (
        "import sys; from optin_service import create_app; "
        f"app = create_app({{'OPTIN_STORAGE_URL': 'sqlite:///{tmp_path}/x.db'}}); "
        "print('psycopg' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert psycopg  # imported here, by this test module


# --- the API on it ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_put_get_history_and_readyz_through_the_api(postgres_url):
    from optin_service import create_app
    from tests.test_api import OK_BODY, PATH, put

    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": postgres_url})
    client = app.test_client()
    url = PATH.format("member-42")
    try:
        assert client.get(url).status_code == 404
        assert client.get("/readyz").status_code == 200
        for status in ("accepted", "declined"):
            response = put(client, {"LOYALTY_OPTIN": status})
            assert (response.status_code, response.data) == (200, OK_BODY)
            response = put(client, {"LOYALTY_OPTIN": status}, url=url)
            assert (response.status_code, response.data) == (200, OK_BODY)
        assert client.get(url).get_json()["LOYALTY_OPTIN"] == "declined"
        items = client.get(url + "/history").get_json()["items"]
        assert [i["LOYALTY_OPTIN"] for i in items] == ["declined", "accepted"]
    finally:
        app.extensions["optin"].store.close()


@pytest.mark.slow
@pytest.mark.postgres_server
def test_a_role_without_the_privileges_it_needs_is_a_503_naming_it(postgres_server):
    """PostgreSQL 15 gives CREATE on the schema public to the database's owner only: a
    role that does not own it cannot create the tables. PUT and GET were 500s with a
    traceback while /readyz said 503; all three are a 503 naming the cause."""
    from optin_service import create_app
    from tests.test_api import PATH, put

    name = f"np_{os.getpid()}_{int(time.monotonic() * 1000)}"
    postgres_server.execute(f"CREATE ROLE {name} LOGIN", f"CREATE DATABASE {name}")
    app = create_app(
        {
            "TESTING": True,
            "OPTIN_STORAGE_URL": postgres_server.url(name).replace("postgres@", f"{name}@"),
        }
    )
    client = app.test_client()
    try:
        for response in (
            put(client, {"LOYALTY_OPTIN": "accepted"}),
            client.get(PATH.format("member-42")),
            client.get("/readyz"),
        ):
            assert response.status_code == 503, response.data
            assert "lacks a privilege" in response.get_json()["errorMessage"]
    finally:
        app.extensions["optin"].store.close()
        postgres_server.execute(f"DROP DATABASE {name}", f"DROP ROLE {name}")


@pytest.mark.slow  # 3 waits of a second for a connection
def test_the_api_answers_503_with_the_server_down():
    from optin_service import create_app
    from tests.test_api import PATH, envelope, put

    url = f"postgresql://127.0.0.1:{free_port()}/optin"
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    client = app.test_client()
    try:
        for response in (
            put(client, {"LOYALTY_OPTIN": "accepted"}, url=PATH.format("m")),
            client.get(PATH.format("m")),
            client.get("/readyz"),
        ):
            assert response.status_code == 503
            assert envelope(response)["errorCode"] == "SERVICE_UNAVAILABLE"
            assert response.headers["Retry-After"].isdigit()
    finally:
        app.extensions["optin"].store.close()


def test_max_wait_covers_the_pool_wait_the_deadline_and_the_cut():
    """What gunicorn.conf.py compares with half the worker timeout (15 s by default)."""
    default = PostgresStore.from_url("postgresql://h/db")
    assert 7 < default.max_wait < 8  # 1 s for a connection, 5.5 s, 1 s, a watchdog tick
    slow = PostgresStore.from_url("postgresql://h/db?statement_timeout_ms=20000")
    assert slow.max_wait > 15
