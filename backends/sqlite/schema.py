"""The SQLite store's tables, and bringing any file to them when a connection opens.

The change feed lives in the file itself: ``optin_change`` (one row per change),
``optin_feed`` (its generation and how far it was pruned), and the state's
``version`` column. Triggers on the state table append the change, so every
statement that moves a member's state appends exactly one change, in that very
statement: a PUT, each row of an import's merge, and a write by a process still
running the previous release during a rolling restart alike.
"""

from __future__ import annotations

import contextlib
import sqlite3

# The evidence and the current state. ``version`` counts the member's changes in
# the feed (0 for a state written before the feed existed, until a rebuild).
_TABLES = (
    """CREATE TABLE IF NOT EXISTS optin (
    correlation_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    client TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS optin_event (
    correlation_id TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'declined')),
    source TEXT NOT NULL,
    client TEXT NOT NULL,
    PRIMARY KEY (correlation_id, updated_us, request_id)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS optin_idempotency (
    correlation_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (correlation_id, idempotency_key)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS optin_idempotency_created ON optin_idempotency (created_us)",
    # AUTOINCREMENT: a seq is never given out twice, even once pruned or rebuilt away,
    # so a cursor names one position for the life of the file.
    """CREATE TABLE IF NOT EXISTS optin_change (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    correlation_id TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    client TEXT NOT NULL,
    previous TEXT,
    version INTEGER NOT NULL,
    appended_us INTEGER NOT NULL
)""",
    # One row: the feed's generation (a rebuild draws a new one: every earlier cursor
    # expires) and the greatest seq pruned (a cursor below it points into removed changes).
    """CREATE TABLE IF NOT EXISTS optin_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation TEXT NOT NULL,
    pruned_through INTEGER NOT NULL
)""",
    # load_state / save_state: the webhook deliverer's position, lease and flags.
    """CREATE TABLE IF NOT EXISTS optin_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID""",
)
# A file of the previous release has the state table without its version.
_HAS_VERSION = "SELECT count(*) FROM pragma_table_info('optin') WHERE name = 'version'"
_ADD_VERSION = "ALTER TABLE optin ADD COLUMN version INTEGER NOT NULL DEFAULT 0"

# SQLite's own clock, in whole ms as µs: a trigger cannot call into Python, and a
# function registered per connection would break writers that did not register it
# (the previous release, the sqlite3 shell). Retention needs no finer time.
_NOW_US = "CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000"
_CHANGE_COLUMNS = (
    "correlation_id, updated_us, request_id, status, source, client, previous, version, appended_us"
)
_NEW = "NEW.correlation_id, NEW.updated_us, NEW.request_id, NEW.status, NEW.source, NEW.client"
# A member's first state, then each move of it. The state's upsert moves it only to
# an event that takes precedence; a skipped DO UPDATE fires nothing, and the
# version's own UPDATE names no column these triggers watch, so each move appends
# one change. Writers are serialised, so seq order is commit order.
_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS optin_first_change AFTER INSERT ON optin
BEGIN
    UPDATE optin SET version = 1 WHERE correlation_id = NEW.correlation_id;
    INSERT INTO optin_change ({_CHANGE_COLUMNS}) VALUES ({_NEW}, NULL, 1, {_NOW_US});
END""",
    f"""CREATE TRIGGER IF NOT EXISTS optin_next_change
AFTER UPDATE OF status, updated_us, request_id, source, client ON optin
BEGIN
    UPDATE optin SET version = OLD.version + 1 WHERE correlation_id = NEW.correlation_id;
    INSERT INTO optin_change ({_CHANGE_COLUMNS})
    VALUES ({_NEW}, OLD.status, OLD.version + 1, {_NOW_US});
END""",
)
_FEED_ROW = (
    "INSERT OR IGNORE INTO optin_feed (id, generation, pruned_through) "
    "VALUES (1, lower(hex(randomblob(8))), 0)"
)
_OBJECTS = (
    "optin",
    "optin_event",
    "optin_idempotency",
    "optin_idempotency_created",
    "optin_change",
    "optin_feed",
    "optin_state",
    "optin_first_change",
    "optin_next_change",
)
# Everything in place (the usual case): one read, no write lock.
_COMPLETE = (
    f"SELECT (SELECT count(*) FROM sqlite_master WHERE name IN ({', '.join('?' * len(_OBJECTS))})) "
    f"= {len(_OBJECTS)} AND ({_HAS_VERSION}) = 1"
)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create what ``conn``'s file lacks: every table of a new file, the feed's tables,
    column and triggers in a file of the previous release (its feed stays empty until
    ``rebuild_changes``), a table dropped under the store.

    Idempotent, and safe with several processes opening one file at once: the work
    runs in one ``BEGIN IMMEDIATE`` transaction, which checks again under the write
    lock. A complete file (every open after the first) is only read.
    """
    if conn.execute(_COMPLETE, _OBJECTS).fetchone()[0]:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _TABLES:
            conn.execute(statement)
        if not conn.execute(_HAS_VERSION).fetchone()[0]:
            conn.execute(_ADD_VERSION)
        for statement in (*_TRIGGERS, _FEED_ROW):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
