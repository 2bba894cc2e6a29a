"""The SQLite store's change feed beyond the contract: files of the previous release,
and several processes writing to one file while a reader tails the feed."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from backends.sqlite import SQLiteStore
from optin_service.feed import CursorExpired
from optin_service.storage import STATUSES, IdempotencyKeyReused, OptInRecord
from optin_service.testing.feed import _assert_consistent, _difference, _read_all

STAMP = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
US = timedelta(microseconds=1)
# Processes are forked: the children use the modules this process imported.
FORK = multiprocessing.get_context("fork")

# The previous release's tables and write statements, as it shipped them
# (backends/sqlite.py before the feed): a file it wrote, and a process of it
# still writing during a rolling restart.
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS optin (
    correlation_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    client TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS optin_event (
    correlation_id TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    source TEXT NOT NULL,
    client TEXT NOT NULL,
    PRIMARY KEY (correlation_id, updated_us, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS optin_idempotency (
    correlation_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (correlation_id, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS optin_idempotency_created ON optin_idempotency (created_us);
"""
_COLUMNS = "correlation_id, updated_us, request_id, status, source, client"
PREVIOUS_INSERT_EVENT = f"INSERT OR IGNORE INTO optin_event ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
PREVIOUS_APPLY_CURRENT = (
    f"INSERT INTO optin ({_COLUMNS}) SELECT {_COLUMNS} FROM optin_event "
    "WHERE correlation_id = ? AND updated_us = ? AND request_id = ? "
    "ON CONFLICT (correlation_id) DO UPDATE SET status = excluded.status, "
    "updated_us = excluded.updated_us, request_id = excluded.request_id, "
    "source = excluded.source, client = excluded.client "
    "WHERE (excluded.updated_us, excluded.status = 'declined', excluded.request_id) "
    "> (optin.updated_us, optin.status = 'declined', optin.request_id)"
)

OLD_EVENTS = [
    OptInRecord("member-1", "accepted", STAMP, "r1", "sms", "crm"),
    OptInRecord("member-1", "declined", STAMP + US, "r2"),
    OptInRecord("member-1", "declined", STAMP - US, "r0"),  # arrived late: history only
    OptInRecord("member-2", "accepted", STAMP, "r3", "web"),
]


def _previous_release_write(conn: sqlite3.Connection, record: OptInRecord) -> None:
    """A PUT as the previous release wrote it: the event, then the state."""
    conn.execute("BEGIN IMMEDIATE")
    if conn.execute(PREVIOUS_INSERT_EVENT, record.row).rowcount:
        conn.execute(PREVIOUS_APPLY_CURRENT, record.row[:3])
    conn.execute("COMMIT")


@pytest.fixture
def previous_file(tmp_path):
    """A database file the previous release wrote: WAL, its schema, some members."""
    path = tmp_path / "optin.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(PREVIOUS_SCHEMA)
        for record in OLD_EVENTS:
            _previous_release_write(conn, record)
    finally:
        conn.close()
    return path


def _columns(path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def test_a_previous_release_file_opens_with_its_evidence_and_an_empty_feed(previous_file):
    store = SQLiteStore.from_url(f"sqlite:///{previous_file}")
    try:
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
    assert _columns(previous_file, "optin")[-1] == "version"


def test_rebuild_gives_an_upgraded_file_the_feed_of_its_whole_history(previous_file):
    store = SQLiteStore.from_url(f"sqlite:///{previous_file}")
    try:
        before = store.changes(None, 10).next
        assert store.rebuild_changes() == len(OLD_EVENTS)
        changes = _read_all(store)
        _assert_consistent(store, changes)
        assert [(c.event, c.previous, c.version) for c in changes] == [
            (OLD_EVENTS[2], None, 1),
            (OLD_EVENTS[0], "declined", 2),
            (OLD_EVENTS[1], "accepted", 3),
            (OLD_EVENTS[3], None, 1),
        ]
        with pytest.raises(CursorExpired):
            store.changes(before, 10)
        newer = OptInRecord("member-2", "declined", STAMP + US, "r5")
        store.set(newer)
        assert [(c.event, c.previous, c.version) for c in _read_all(store, changes[-1].cursor)] == [
            (newer, "accepted", 2)
        ]
    finally:
        store.close()


def test_a_previous_release_writing_to_an_upgraded_file_appends_its_changes(previous_file):
    """During a rolling restart, workers of both releases write to one file: the
    database appends the old workers' changes too, with their versions."""
    store = SQLiteStore.from_url(f"sqlite:///{previous_file}")
    old = sqlite3.connect(previous_file, isolation_level=None)
    try:
        store.rebuild_changes()
        first = OptInRecord("member-1", "accepted", STAMP + 2 * US, "r4")
        stale = OptInRecord("member-1", "accepted", STAMP, "r9")
        _previous_release_write(old, first)
        _previous_release_write(old, stale)  # older than the state: no change
        _previous_release_write(old, OptInRecord("member-3", "declined", STAMP, "r6"))
        store.set(OptInRecord("member-1", "declined", STAMP + 3 * US, "r7"))
        changes = _read_all(store)
        _assert_consistent(store, changes)
        assert [(c.event.request_id, c.version) for c in changes[len(OLD_EVENTS) :]] == [
            ("r4", 4),
            ("r6", 1),
            ("r7", 5),
        ]
    finally:
        old.close()
        store.close()


def _open_and_write(url: str, n: int, barrier) -> None:
    barrier.wait(10)
    store = SQLiteStore.from_url(url)
    try:
        store.set(OptInRecord(f"opener-{n}", "accepted", STAMP, f"r{n}"))
    finally:
        store.close()


def test_workers_opening_a_previous_release_file_at_once_upgrade_it_once(previous_file):
    processes = 6
    barrier = FORK.Barrier(processes)
    url = f"sqlite:///{previous_file}"
    workers = [
        FORK.Process(target=_open_and_write, args=(url, n, barrier)) for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0] * processes
    assert _columns(previous_file, "optin").count("version") == 1
    store = SQLiteStore.from_url(url)
    try:
        changes = _read_all(store)
        assert sorted(c.event.correlation_id for c in changes) == [
            f"opener-{n}" for n in range(processes)
        ]
        assert {c.version for c in changes} == {1}
    finally:
        store.close()


# --- several processes writing while a reader tails --------------------------------

MEMBERS = [f"member-{i}" for i in range(8)]


def _writer(url: str, t: int, writes: int, caught_up) -> None:
    store = SQLiteStore.from_url(url)
    rng = random.Random(t)
    try:
        for i in range(writes):
            if i == writes // 3:
                caught_up.wait(10)  # let the reader catch something mid-stream
            # Times mostly rising, so most writes are changes; some fall behind.
            stamp = STAMP + (i * 4 + rng.randrange(12)) * US
            record = OptInRecord(rng.choice(MEMBERS), rng.choice(STATUSES), stamp, f"w{t}-{i}")
            try:
                store.set(record, idempotency_key=f"k{t}-{i // 2}" if i % 4 < 2 else None)
            except IdempotencyKeyReused:
                pass
    finally:
        store.close()


def _importer(url: str, caught_up) -> None:
    store = SQLiteStore.from_url(url, import_batch=7)
    rng = random.Random(99)
    try:
        caught_up.wait(10)
        store.import_rows(
            OptInRecord(
                rng.choice(MEMBERS), rng.choice(STATUSES), STAMP + rng.randrange(620) * US, f"i{n}"
            ).row
            for n in range(150)
        )
    finally:
        store.close()


def test_a_reader_tailing_while_processes_write_sees_each_change_once_in_order(tmp_path):
    """Writers in other processes (as gunicorn workers) commit in an order no thread
    of the reader's controls; the reader still sees every change once, in the order
    a reader from the start sees afterwards."""
    url = f"sqlite:///{tmp_path}/optin.db?synchronous=NORMAL"
    store = SQLiteStore.from_url(url)
    store.check()  # the file and its tables exist before the writers start
    caught_up = FORK.Event()
    workers = [FORK.Process(target=_writer, args=(url, t, 150, caught_up)) for t in range(4)]
    workers.append(FORK.Process(target=_importer, args=(url, caught_up)))
    try:
        for worker in workers:
            worker.start()
        tailed, after, while_writing = [], None, 0
        while True:
            done = not any(w.is_alive() for w in workers)  # before the read: then empty is the end
            page = store.changes(after, 3)
            tailed.extend(page.changes)
            after = page.next
            if page.changes:
                caught_up.set()
                while_writing += 0 if done else len(page.changes)
            elif done:
                break
            else:
                time.sleep(0.001)
        assert [w.exitcode for w in workers] == [0] * len(workers)
        full = _read_all(store)
        assert tailed == full, _difference("tailed", tailed, "read afterwards", full)
        assert while_writing > 0
        _assert_consistent(store, full)
        assert {c.event.correlation_id for c in full} == set(MEMBERS)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        store.close()
