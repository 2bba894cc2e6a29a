"""The SQLite store's statements (its tables are in :mod:`backends.sqlite.schema`)."""

from __future__ import annotations

COLUMNS = "correlation_id, updated_us, request_id, status, source, client"
INSERT_EVENT = f"INSERT OR IGNORE INTO optin_event ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
# The precedence rule (OptInRecord.precedence), the one place it is written in SQL:
# an upsert into the current state moves it only to an event that takes precedence:
# newer; as new and "declined" over "accepted"; then the greater request id. Each
# move appends its change (the schema's triggers).
_UPSERT_CURRENT = (
    "ON CONFLICT (correlation_id) DO UPDATE SET status = excluded.status, "
    "updated_us = excluded.updated_us, request_id = excluded.request_id, "
    "source = excluded.source, client = excluded.client "
    "WHERE (excluded.updated_us, excluded.status = 'declined', excluded.request_id) "
    "> (optin.updated_us, optin.status = 'declined', optin.request_id)"
)
# The state is copied from the stored event, so an import whose event was already
# stored (same identity, other fields) cannot put a state in place that no stored
# event holds. ("WHERE true" tells SQLite's parser the ON CONFLICT is the upsert's.)
APPLY_CURRENT = (
    f"INSERT INTO optin ({COLUMNS}) SELECT {COLUMNS} FROM optin_event "
    "WHERE correlation_id = ? AND updated_us = ? AND request_id = ? "
    f"{_UPSERT_CURRENT}"
)
SELECT = f"SELECT {COLUMNS} FROM optin WHERE correlation_id = ?"
HISTORY = (
    f"SELECT {COLUMNS} FROM optin_event WHERE correlation_id = ? "
    "AND (updated_us, request_id) < (?, ?) "
    "ORDER BY updated_us DESC, request_id DESC LIMIT ?"
)
COUNT_EVENTS = "SELECT COUNT(*) FROM optin_event"
KEY_SELECT = (
    "SELECT fingerprint FROM optin_idempotency "
    "WHERE correlation_id = ? AND idempotency_key = ? AND created_us > ?"
)
KEY_PUT = (
    "INSERT OR REPLACE INTO optin_idempotency "
    "(correlation_id, idempotency_key, fingerprint, created_us) VALUES (?, ?, ?, ?)"
)
KEY_PRUNE = "DELETE FROM optin_idempotency WHERE created_us <= ?"

# --- bulk import (import_rows) ---------------------------------------------------
# The stream is staged as it comes (seq, the rowid, keeps its order), then cut down
# to the first row of each identity and keyed in import order
# (optin_service.feed.import_order), then merged in chunks copied out in that order:
# the chunk's rowid order is import order, so each member's events are applied
# oldest first, across chunk boundaries too (the state carries over), and each one
# that moves the state appends its change.
_TYPED_COLUMNS = (
    "correlation_id TEXT, updated_us INTEGER, request_id TEXT, status TEXT, source TEXT, "
    "client TEXT"
)
STAGE = f"CREATE TEMP TABLE optin_staged (seq INTEGER PRIMARY KEY, {_TYPED_COLUMNS})"
STAGE_INSERT = f"INSERT INTO temp.optin_staged ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
UNIQUE = (
    f"CREATE TEMP TABLE optin_unique ({_TYPED_COLUMNS}, declined INTEGER, first_seq INTEGER, "
    "PRIMARY KEY (correlation_id, updated_us, declined, request_id)) WITHOUT ROWID"
)
# With min() as the only aggregate, SQLite takes a group's bare columns from the row
# holding the minimum: here the first row of each identity in the stream. The groups
# come out in identity order, which is import order but for ties in time, so the
# key's b-tree fills almost in order.
UNIQUE_FILL = (
    f"INSERT INTO temp.optin_unique ({COLUMNS}, declined, first_seq) "
    f"SELECT {COLUMNS}, status = 'declined', min(seq) FROM temp.optin_staged "
    "GROUP BY correlation_id, updated_us, request_id"
)
CHUNK = f"CREATE TEMP TABLE optin_chunk ({_TYPED_COLUMNS})"
CHUNK_FILL = (
    f"INSERT INTO temp.optin_chunk ({COLUMNS}) SELECT {COLUMNS} FROM temp.optin_unique "
    "WHERE (correlation_id, updated_us, declined, request_id) > (?, ?, ?, ?) "
    "ORDER BY correlation_id, updated_us, declined, request_id LIMIT ?"
)
#: Before the first row of any import (times are within ±2**53 µs).
CHUNK_START = ("", -(2**63), -1, "")
CHUNK_LAST = (
    "SELECT correlation_id, updated_us, status = 'declined', request_id FROM temp.optin_chunk "
    "ORDER BY rowid DESC LIMIT 1"
)
CHUNK_EVENTS = (
    f"INSERT OR IGNORE INTO optin_event ({COLUMNS}) SELECT {COLUMNS} FROM temp.optin_chunk "
    "ORDER BY rowid"
)
# Every event of the chunk in turn; the state moves only to one that takes
# precedence, so it ends on the greatest. Used when every row of the chunk was
# new, hence is exactly what is stored.
CHUNK_CURRENT = (
    f"INSERT INTO optin ({COLUMNS}) SELECT {COLUMNS} FROM temp.optin_chunk "
    f"WHERE true ORDER BY rowid {_UPSERT_CURRENT}"
)
# Otherwise (some events were stored already, maybe with other fields), from the
# stored events, as APPLY_CURRENT does: one stored already never takes precedence
# over the state, so it appends no change.
CHUNK_CURRENT_STORED = (
    f"INSERT INTO optin ({COLUMNS}) SELECT {', '.join('e.' + c for c in COLUMNS.split(', '))} "
    "FROM temp.optin_chunk c JOIN optin_event e USING (correlation_id, updated_us, request_id) "
    f"WHERE true ORDER BY c.rowid {_UPSERT_CURRENT}"
)
DROP_TEMP = tuple(
    f"DROP TABLE IF EXISTS temp.{table}"
    for table in ("optin_staged", "optin_unique", "optin_chunk")
)

# --- the change feed -------------------------------------------------------------
# The feed's generation, where it starts (after the changes pruned) and the greatest
# seq ever given out (AUTOINCREMENT's own record of it).
FEED = (
    "SELECT generation, pruned_through, "
    "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'optin_change'), 0) FROM optin_feed"
)
CHANGES = (
    f"SELECT seq, {COLUMNS}, previous, version FROM optin_change WHERE seq > ? ORDER BY seq LIMIT ?"
)
# The oldest changes appended before a time, up to a batch: the feed is pruned from
# its start, so it always holds every change after the cursor it starts at.
PRUNE_CUT = (
    "WITH head AS (SELECT seq, appended_us FROM optin_change ORDER BY seq LIMIT :batch) "
    "SELECT max(seq), count(*) FROM head WHERE seq < coalesce("
    "(SELECT min(seq) FROM head WHERE appended_us >= :before), 9223372036854775807)"
)
PRUNE = "DELETE FROM optin_change WHERE seq <= ?"
PRUNED_THROUGH = "UPDATE optin_feed SET pruned_through = max(pruned_through, ?)"
# Rebuild: a new generation starting after every seq given out so far, then each
# member's events in precedence order, each a change, and the states' counts.
REBUILD_CLEAR = "DELETE FROM optin_change"
REBUILD_GENERATION = (
    "UPDATE optin_feed SET generation = lower(hex(randomblob(8))), pruned_through = "
    "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'optin_change'), 0)"
)
_PRECEDENCE = "updated_us, status = 'declined', request_id"
REBUILD_CHANGES = (
    f"INSERT INTO optin_change ({COLUMNS}, previous, version, appended_us) "
    f"SELECT {COLUMNS}, lag(status) OVER member, row_number() OVER member, ? FROM optin_event "
    f"WINDOW member AS (PARTITION BY correlation_id ORDER BY {_PRECEDENCE}) "
    f"ORDER BY correlation_id, {_PRECEDENCE}"
)
# Sets only the version: the triggers watch the event's columns, so none fires.
REBUILD_VERSIONS = (
    "UPDATE optin SET version = "
    "(SELECT count(*) FROM optin_event e WHERE e.correlation_id = optin.correlation_id)"
)

# --- the deliverer's state (load_state, save_state) --------------------------------
STATE_GET = "SELECT value FROM optin_state WHERE key = ?"
STATE_ABSENT = "SELECT NOT EXISTS (SELECT 1 FROM optin_state WHERE key = ?)"
STATE_PUT = "INSERT OR REPLACE INTO optin_state (key, value) VALUES (?, ?)"
STATE_ADD = "INSERT OR IGNORE INTO optin_state (key, value) VALUES (?, ?)"
STATE_SWAP = "UPDATE optin_state SET value = ? WHERE key = ? AND value = ?"
STATE_DELETE = "DELETE FROM optin_state WHERE key = ?"
STATE_DELETE_IF = "DELETE FROM optin_state WHERE key = ? AND value = ?"

# --- check() ---------------------------------------------------------------------
# One row, rewritten by every readiness check; a table of its own, so the evidence
# tables are never touched, created by the first check (a read-only database the
# store only reads needs no new table).
HEALTH_TABLE = (
    "CREATE TABLE IF NOT EXISTS optin_health (id INTEGER PRIMARY KEY, checked_us INTEGER)"
)
HEALTH_WRITE = "INSERT OR REPLACE INTO optin_health (id, checked_us) VALUES (1, ?)"
