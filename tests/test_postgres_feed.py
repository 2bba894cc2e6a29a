"""The PostgreSQL store's change feed beyond the contract: commit order with a commit
held back, a database of schema version 1 (upgrade, a previous release writing),
imports and rebuilds racing writes."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from backends.postgres import PostgresStore
from backends.postgres.schema import MIGRATIONS, VERSION
from optin_service.feed import CursorExpired
from optin_service.storage import STATUSES, OptInRecord, StorageUnavailable
from optin_service.testing.feed import _assert_consistent, _difference, _read_all

pytestmark = [pytest.mark.slow, pytest.mark.postgres_server]

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
US = timedelta(microseconds=1)

# A write as the backend wrote it at schema version 1 (before the feed): the event, and the state
# copied from it when it takes precedence, in one statement. A worker of that
# version still runs it during a rolling restart.
_COLUMNS = "correlation_id, updated_us, request_id, status, source, client"
PREVIOUS_WRITE = f"""
WITH event AS (
    INSERT INTO optin_event ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)
    ON CONFLICT DO NOTHING
    RETURNING {_COLUMNS}
)
INSERT INTO optin AS current ({_COLUMNS})
SELECT {_COLUMNS} FROM event
ON CONFLICT (correlation_id) DO UPDATE SET
    updated_us = excluded.updated_us, request_id = excluded.request_id,
    status = excluded.status, source = excluded.source, client = excluded.client
WHERE (excluded.updated_us, excluded.status = 'declined', excluded.request_id)
    > (current.updated_us, current.status = 'declined', current.request_id)
"""

OLD_EVENTS = [
    OptInRecord("member-1", "accepted", STAMP, "r1", "sms", "crm"),
    OptInRecord("member-1", "declined", STAMP + US, "r2"),
    OptInRecord("member-1", "declined", STAMP - US, "r0"),  # arrived late: history only
    OptInRecord("member-2", "accepted", STAMP, "r3", "web"),
]


def _until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.01)


def _entries(changes) -> list[tuple[str, str | None, int]]:
    return [(c.event.request_id, c.previous, c.version) for c in changes]


@pytest.fixture
def store(postgres_url):
    store = PostgresStore.from_url(postgres_url)
    yield store
    store.close()


@pytest.fixture
def previous_database(postgres_url):
    """The URL of a schema the backend created at version 1 (before the feed) and wrote to."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(MIGRATIONS[1])
        conn.execute(
            "CREATE TABLE optin_schema_version (id boolean PRIMARY KEY DEFAULT true "
            "CHECK (id), version integer NOT NULL)"
        )
        conn.execute("INSERT INTO optin_schema_version (version) VALUES (1)")
        for record in OLD_EVENTS:
            conn.execute(PREVIOUS_WRITE, record.row)
    return postgres_url


def _held_write(url: str, record: OptInRecord) -> psycopg.Connection:
    """A connection whose open transaction has written ``record`` (a new member), its
    change appended by the state's trigger: everything but the COMMIT."""
    conn = psycopg.connect(url)
    conn.execute(PREVIOUS_WRITE, record.row)
    return conn


def _waiting_for_a_lock(server, kind: str) -> bool:
    rows = server.execute(
        f"SELECT count(*) FROM pg_locks WHERE locktype = '{kind}' AND NOT granted"
    )
    return rows[0][0] > 0


# --- commit order ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["feed-lock", "plain-sequence"])
def test_a_reader_tailing_past_a_slow_commit_does_not_skip_it(
    store, postgres_url, postgres_server, scheme
):
    """Writer A appends its change (it has taken its seq) and holds its COMMIT back;
    writer B writes another member meanwhile; a reader tails the feed; then A commits.

    With the feed's lock, B waits for A's COMMIT, so the reader sees neither, then A's
    change and B's, once each, as a later full read does. With a plain sequence (the
    lock made a no-op), B commits the greater seq first, the reader passes it, and A's
    change, visible only later below the reader's cursor, is never read: the failure
    the lock prevents (this variant proves the test catches it)."""
    start = store.changes(None, 10).next  # creates the tables
    if scheme == "plain-sequence":
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "CREATE OR REPLACE FUNCTION optin_feed_lock() RETURNS void AS '' LANGUAGE sql"
            )
    slow = OptInRecord("slow", "accepted", STAMP, "a")
    fast = OptInRecord("fast", "declined", STAMP, "b")
    held = _held_write(postgres_url, slow)
    try:
        writer = threading.Thread(target=store.set, args=(fast,))
        writer.start()
        _until(
            lambda: not writer.is_alive() or _waiting_for_a_lock(postgres_server, "advisory"),
            "B done or waiting for the feed's lock",
        )
        tailed = list(store.changes(start, 10).changes)  # the reader passes by
        after = tailed[-1].cursor if tailed else start
        held.commit()
    finally:
        held.close()
    writer.join(10)
    assert not writer.is_alive()
    tailed += _read_all(store, after)
    full = _read_all(store)
    assert [c.event for c in full] == [slow, fast]  # seq order: A took its seq first
    if scheme == "feed-lock":
        assert tailed == full, _difference("tailed", tailed, "read afterwards", full)
    else:
        assert [c.event for c in tailed] == [fast]  # A's change skipped


def test_writers_on_many_connections_and_a_slow_one_keep_commit_order(store, postgres_url):
    """Threads write (each PUT its own transaction) while one writer sleeps between its
    append and its COMMIT, several times, and a reader tails in pages of 2: the reader
    sees what a later full read sees, in the same order."""
    store.get("warm-up")
    done = threading.Event()
    tailed: list = []

    def slow_writer() -> None:
        with psycopg.connect(postgres_url) as conn:
            for i in range(5):
                conn.execute(PREVIOUS_WRITE, OptInRecord(f"slow-{i}", "accepted", STAMP, "s").row)
                conn.execute("SELECT pg_sleep(0.05)")  # the change appended, not committed
                conn.commit()

    def writer(t: int) -> None:
        for i in range(25):
            store.set(
                OptInRecord(f"m{i % 4}", STATUSES[i % 2], STAMP + (i * 4 + t) * US, f"w{t}-{i}")
            )

    def tail() -> None:
        after = None
        while True:
            finished = done.is_set()
            page = store.changes(after, 2)
            tailed.extend(page.changes)
            after = page.next
            if not page.changes:
                if finished:
                    return
                time.sleep(0.002)

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    threads.append(threading.Thread(target=slow_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    reader.join(60)
    full = _read_all(store)
    assert tailed == full, _difference("tailed", tailed, "read afterwards", full)
    assert len(full) > 5
    _assert_consistent(store, full)


# --- a database of schema version 1 ------------------------------------------------------


def test_a_version_1_database_is_upgraded_with_its_evidence_and_an_empty_feed(previous_database):
    store = PostgresStore.from_url(previous_database)
    try:
        with pytest.raises(StorageUnavailable, match=f"needs {VERSION}: run `optin db upgrade`"):
            store.get("member-1")
        assert store.upgrade() == (1, VERSION)
        assert store.get("member-1") == OLD_EVENTS[1]
        assert store.get("member-2") == OLD_EVENTS[3]
        assert sorted(store.rows()) == sorted(e.row for e in OLD_EVENTS)
        page = store.changes(None, 10)
        assert page.changes == []
        # Its states have made no change in the feed yet: the next one is their first,
        # replacing the status they had.
        newer = OptInRecord("member-1", "accepted", STAMP + 2 * US, "r4")
        store.set(newer)
        [change] = store.changes(page.next, 10).changes
        assert (change.event, change.previous, change.version) == (newer, "declined", 1)
        assert store.load_state("position") is None
        assert store.save_state("position", "p", expected=None)
    finally:
        store.close()


def test_rebuild_gives_an_upgraded_database_the_feed_of_its_whole_history(previous_database):
    store = PostgresStore.from_url(previous_database)
    try:
        store.upgrade()
        before = store.changes(None, 10).next
        assert store.rebuild_changes() == len(OLD_EVENTS)
        changes = _read_all(store)
        _assert_consistent(store, changes)
        assert _entries(changes) == [
            ("r0", None, 1),
            ("r1", "declined", 2),
            ("r2", "accepted", 3),
            ("r3", None, 1),
        ]
        with pytest.raises(CursorExpired):
            store.changes(before, 10)
        newer = OptInRecord("member-2", "declined", STAMP + US, "r5")
        store.set(newer)
        assert _entries(_read_all(store, changes[-1].cursor)) == [("r5", "accepted", 2)]
    finally:
        store.close()


def test_a_previous_release_writing_after_the_upgrade_appends_its_changes(previous_database):
    """During a rolling restart, workers of both releases write to one database: the
    state's triggers append the old workers' changes too, with their versions."""
    store = PostgresStore.from_url(previous_database)
    try:
        store.upgrade()
        store.rebuild_changes()
        with psycopg.connect(previous_database, autocommit=True) as old:
            old.execute(
                PREVIOUS_WRITE, OptInRecord("member-1", "accepted", STAMP + 2 * US, "r4").row
            )
            old.execute(
                PREVIOUS_WRITE, OptInRecord("member-1", "accepted", STAMP, "r9").row
            )  # older
            old.execute(PREVIOUS_WRITE, OptInRecord("member-3", "declined", STAMP, "r6").row)
        store.set(OptInRecord("member-1", "declined", STAMP + 3 * US, "r7"))
        changes = _read_all(store)
        _assert_consistent(store, changes)
        assert _entries(changes[len(OLD_EVENTS) :]) == [
            ("r4", "declined", 4),
            ("r6", None, 1),
            ("r7", "accepted", 5),
        ]
    finally:
        store.close()


# --- imports and rebuilds beside writes ---------------------------------------------------


@pytest.mark.parametrize("member", ["existing", "new"])
def test_an_import_racing_a_write_on_its_member_merges_again(
    store, postgres_url, postgres_server, member
):
    """A write moves (or creates) a member's state after an import's merge read it, and
    commits while the merge waits for the row: the merge rolls its chunk back and runs
    again from the new state, so versions stay without gaps or repeats and the last
    change is the state."""
    if member == "existing":
        store.set(OptInRecord("m", "accepted", STAMP, "first"))
    else:
        store.get("m")  # the tables only
    racing = OptInRecord("m", "declined", STAMP + 5 * US, "racing")
    held = _held_write(postgres_url, racing)
    imported = [OptInRecord("m", STATUSES[i % 2], STAMP + i * US, f"i{i}").row for i in range(1, 9)]
    result: list[int] = []
    try:
        importer = threading.Thread(target=lambda: result.append(store.import_rows(imported)))
        importer.start()
        # On the row the write holds (an existing member's state) or on its transaction
        # (the new member's state it inserted).
        _until(
            lambda: _waiting_for_a_lock(postgres_server, "transactionid"),
            "the merge waiting for the write",
        )
        held.commit()
    finally:
        held.close()
    importer.join(30)
    assert result == [8]
    changes = _read_all(store)
    _assert_consistent(store, changes)
    ids = [c.event.request_id for c in changes]
    first = ["first"] if member == "existing" else []
    # The racing write came first; of the import, the events newer than it are changes.
    assert ids == [*first, "racing", "i6", "i7", "i8"]


def test_a_write_during_a_rebuild_waits_and_comes_after_it(store, postgres_url, postgres_server):
    """A rebuild locks the writers out for its transaction: a write in flight when it
    starts finishes first (in the rebuilt feed), one arriving meanwhile waits and
    appends after it with the rebuilt version count."""
    store.set(OptInRecord("m", "accepted", STAMP, "r1"))
    held = _held_write(postgres_url, OptInRecord("n", "accepted", STAMP, "r2"))
    try:
        rebuild = threading.Thread(target=store.rebuild_changes)
        rebuild.start()
        _until(lambda: _waiting_for_a_lock(postgres_server, "relation"), "the rebuild waiting")
        later = threading.Thread(
            target=store.set, args=(OptInRecord("m", "declined", STAMP + US, "r3"),)
        )
        later.start()
        time.sleep(0.2)
        assert later.is_alive()  # waiting behind the rebuild
        held.commit()
    finally:
        held.close()
    rebuild.join(10)
    later.join(10)
    changes = _read_all(store)
    _assert_consistent(store, changes)
    assert _entries(changes) == [("r1", None, 1), ("r2", None, 1), ("r3", "accepted", 2)]
