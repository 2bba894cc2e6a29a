"""The store's SQL, one named constant per statement.

Columns are listed in :data:`~optin_service.storage.EventRow` order everywhere, so
a row read is an ``EventRow`` as it is.
"""

from __future__ import annotations

COLUMNS = "correlation_id, updated_us, request_id, status, source, client"

# The current state moves only to an event that takes precedence over it: newer;
# as new and declined over accepted; then the greater request id
# (OptInRecord.precedence). Each move appends its change in the same statement (the
# state's triggers, migrations/0002_change_feed.sql); a bulk merge appends its own.
_APPLY = f"""
INSERT INTO optin AS current ({COLUMNS})
SELECT {COLUMNS} FROM {{source}}
ON CONFLICT (correlation_id) DO UPDATE SET
    updated_us = excluded.updated_us, request_id = excluded.request_id,
    status = excluded.status, source = excluded.source, client = excluded.client
WHERE (excluded.updated_us, excluded.status = 'declined', excluded.request_id)
    > (current.updated_us, current.status = 'declined', current.request_id)
RETURNING 1
"""

# One write: the event, then the current state from it, in one statement (so one
# transaction and one round trip). The state is copied from the event inserted,
# so an event already stored (same member, time and request id) changes nothing,
# whatever its other fields say. With a key (%(key)s not null), nothing is written
# unless the key is new for this member: (key is new, state changed).
WRITE = f"""
WITH fresh_key AS (
    INSERT INTO optin_idempotency (correlation_id, idempotency_key, fingerprint, created_us)
    SELECT %(cid)s, %(key)s, %(fingerprint)s, %(now)s WHERE %(key)s::text IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
), event AS (
    INSERT INTO optin_event ({COLUMNS})
    SELECT %(cid)s, %(us)s, %(rid)s, %(status)s, %(source)s, %(client)s
    WHERE %(key)s::text IS NULL OR EXISTS (SELECT FROM fresh_key)
    ON CONFLICT DO NOTHING
    RETURNING {COLUMNS}
), applied AS ({_APPLY.format(source="event")})
SELECT EXISTS (SELECT FROM fresh_key), EXISTS (SELECT FROM applied)
"""

# A key this member used before: locked (so concurrent retries queue, and so a
# replay's COMMIT waits for a synchronous standby like a write's would).
KEY_LOCK = (
    "SELECT fingerprint, created_us FROM optin_idempotency "
    "WHERE correlation_id = %s AND idempotency_key = %s FOR UPDATE"
)
KEY_RENEW = (
    "UPDATE optin_idempotency SET fingerprint = %s, created_us = %s "
    "WHERE correlation_id = %s AND idempotency_key = %s"
)
# The key of a request whose earlier use expired (or was just deleted as expired):
# it starts a new 24 h window with this request. Nothing if another request has
# claimed it meanwhile.
KEY_CLAIM = """
INSERT INTO optin_idempotency AS k (correlation_id, idempotency_key, fingerprint, created_us)
VALUES (%(cid)s, %(key)s, %(fingerprint)s, %(now)s)
ON CONFLICT (correlation_id, idempotency_key) DO UPDATE
SET fingerprint = excluded.fingerprint, created_us = excluded.created_us
WHERE k.created_us <= %(since)s
RETURNING 1
"""
# Expired keys, a bounded number at a time (see PostgresStore._prune).
KEY_PRUNE = """
DELETE FROM optin_idempotency WHERE (correlation_id, idempotency_key) IN (
    SELECT correlation_id, idempotency_key FROM optin_idempotency
    WHERE created_us <= %s LIMIT %s
)
"""

GET = f"SELECT {COLUMNS} FROM optin WHERE correlation_id = %s"
# Keyset pagination on the primary key, newest first.
HISTORY = f"""
SELECT {COLUMNS} FROM optin_event
WHERE correlation_id = %s AND (updated_us, request_id) < (%s, %s)
ORDER BY updated_us DESC, request_id DESC
LIMIT %s
"""
COUNT = "SELECT count(*) FROM optin_event"
HEALTH = (
    "INSERT INTO optin_health (checked_us) VALUES (%s) "
    "ON CONFLICT (id) DO UPDATE SET checked_us = excluded.checked_us"
)

EXPORT = f"SELECT {COLUMNS} FROM optin_event"
EXPORT_SINCE = EXPORT + " WHERE updated_us >= %s"

# --- bulk import -------------------------------------------------------------------
# The whole stream is copied into a temporary stage first (seq keeps its order), then
# cut down to the first row of each identity and numbered in import order
# (optin_service.feed.import_order): n. Chunks of n are then merged one transaction
# each, in n order: each member's events are applied oldest first across the whole
# import (a member's events may span chunks: the state carries over), whatever the
# order of the stream. Merging batch by batch as they came would not give that: an
# event of a later batch older than the state an earlier batch left would be no change.
# Session tables (one connection holds them for the whole import), dropped at the end.
STAGE = """
CREATE TEMPORARY TABLE optin_staged (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    correlation_id text COLLATE "C", updated_us bigint, request_id text COLLATE "C",
    status text, source text, client text
)
"""
STAGE_COPY = f"COPY optin_staged ({COLUMNS}) FROM STDIN"
NUMBER = f"""
CREATE TEMPORARY TABLE optin_unique AS
SELECT row_number() OVER (
    ORDER BY correlation_id, updated_us, status = 'declined', request_id
) AS n, {COLUMNS}
FROM (
    SELECT DISTINCT ON (correlation_id, updated_us, request_id) {COLUMNS} FROM optin_staged
    ORDER BY correlation_id, updated_us, request_id, seq
) AS first
"""
NUMBER_KEY = "ALTER TABLE optin_unique ADD PRIMARY KEY (n)"
NUMBERED = "SELECT count(*) FROM optin_unique"
# A chunk's changes, between its merge and their append (emptied by each COMMIT).
CHUNK_CHANGES = """
CREATE TEMPORARY TABLE optin_chunk_change (
    correlation_id text COLLATE "C", updated_us bigint, request_id text COLLATE "C",
    status text, source text, client text, previous text, version bigint
) ON COMMIT DELETE ROWS
"""
DROP_STAGE = (
    "DROP TABLE IF EXISTS pg_temp.optin_staged, pg_temp.optin_unique, pg_temp.optin_chunk_change"
)
# The merge appends its own changes: the state's triggers stay quiet in its transaction.
BULK_FEED = "SET LOCAL optin.bulk_feed = on"
# One chunk, n in (lo, hi]: its new events go in (one stored already is skipped); of
# each member's new events in import order, those that take precedence over its
# state before the chunk are its changes, every one (each takes precedence over the
# one before it), versions counting on from the state's, each replacing the one
# before; the state moves to the last, as applying them one by one would leave it.
# The state is read from the statement's snapshot: a write that moved it since is
# caught by the UPDATE's condition (re-checked on the row's newest version) or by
# the INSERT's conflict, and the counts returned then differ (the caller rolls the
# chunk back and merges it again). Returns (new events, members moved, states written).
MERGE = f"""
WITH new AS (
    INSERT INTO optin_event ({COLUMNS})
    SELECT {COLUMNS} FROM optin_unique WHERE n > %(lo)s AND n <= %(hi)s ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING {COLUMNS}
), chunk AS (  -- its members are a range of ids: read the states of that range only
    SELECT min(correlation_id) AS first, max(correlation_id) AS last FROM optin_unique
    WHERE n > %(lo)s AND n <= %(hi)s
), moved AS (
    SELECT new.*, s.status AS prior_status, s.updated_us AS prior_us,
        s.request_id AS prior_rid, s.version AS prior_version
    FROM new LEFT JOIN optin AS s ON s.correlation_id = new.correlation_id
        AND s.correlation_id BETWEEN (SELECT first FROM chunk) AND (SELECT last FROM chunk)
    WHERE s.correlation_id IS NULL
        OR (new.updated_us, new.status = 'declined', new.request_id)
        > (s.updated_us, s.status = 'declined', s.request_id)
), changes AS (
    SELECT {COLUMNS}, prior_us, prior_rid, prior_version,
        coalesce(lag(status) OVER member, prior_status) AS previous,
        coalesce(prior_version, 0) + row_number() OVER member AS version,
        lead(correlation_id) OVER member IS NULL AS last
    FROM moved
    WINDOW member AS (
        PARTITION BY correlation_id ORDER BY updated_us, status = 'declined', request_id
    )
), noted AS (
    INSERT INTO optin_chunk_change ({COLUMNS}, previous, version)
    SELECT {COLUMNS}, previous, version FROM changes
), updated AS (
    UPDATE optin AS s SET updated_us = c.updated_us, request_id = c.request_id,
        status = c.status, source = c.source, client = c.client, version = c.version
    FROM changes AS c
    WHERE c.last AND c.prior_version IS NOT NULL AND s.correlation_id = c.correlation_id
        AND s.correlation_id BETWEEN (SELECT first FROM chunk) AND (SELECT last FROM chunk)
        AND (s.updated_us, s.request_id, s.version) = (c.prior_us, c.prior_rid, c.prior_version)
    RETURNING 1
), inserted AS (
    INSERT INTO optin ({COLUMNS}, version)
    SELECT {COLUMNS}, version FROM changes WHERE last AND prior_version IS NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM changes WHERE last),
    (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted)
"""
# Then, under the feed's lock (held to COMMIT), the chunk's changes in import order.
FEED_LOCK = "SELECT optin_feed_lock()"
APPEND_CHUNK = f"""
INSERT INTO optin_change ({COLUMNS}, previous, version, appended_us)
SELECT {COLUMNS}, previous, version, optin_now_us() FROM optin_chunk_change
ORDER BY correlation_id, updated_us, status = 'declined', request_id
"""

# --- the change feed ---------------------------------------------------------------
# One statement, so one snapshot: the feed's generation, where it starts (after the
# changes pruned), the greatest seq given out (the sequence is not transactional:
# it counts seqs of changes not committed yet too), and the page after a seq
# (%(after)s, or where the feed starts). The caller checks the cursor against the
# first three and discards the page if the cursor is not valid.
CHANGES = f"""
SELECT f.generation, f.pruned_through,
    coalesce(pg_sequence_last_value('optin_change_seq'), 0),
    c.seq, {", ".join("c." + c for c in COLUMNS.split(", "))}, c.previous, c.version
FROM optin_feed AS f LEFT JOIN LATERAL (
    SELECT * FROM optin_change WHERE seq > coalesce(%(after)s::bigint, f.pruned_through)
    ORDER BY seq LIMIT %(limit)s
) AS c ON true
ORDER BY c.seq
"""
# From the feed's start, up to a batch of changes appended before a time (µs, the
# server's clock), stopping at the first one appended at or after it; their seqs
# are never reused, so what a cursor points at is either kept or pruned.
PRUNE = """
WITH head AS (
    SELECT seq, appended_us FROM optin_change ORDER BY seq LIMIT %(batch)s
), cut AS (
    SELECT max(seq) AS seq, count(*) AS n FROM head WHERE seq < coalesce(
        (SELECT min(seq) FROM head WHERE appended_us >= %(before)s), 9223372036854775807
    )
), gone AS (
    DELETE FROM optin_change WHERE seq <= (SELECT seq FROM cut) RETURNING 1
), moved AS (
    UPDATE optin_feed SET pruned_through = greatest(pruned_through, (SELECT seq FROM cut))
    WHERE (SELECT n FROM cut) > 0
)
SELECT (SELECT n FROM cut), (SELECT count(*) FROM gone)
"""
# Rebuild, in one transaction. Writers are shut out first: every write locks optin
# (and optin_event) for its statement's transaction, so once these locks are held no
# write is in flight and none starts until COMMIT; readers go on reading the old feed.
# Same order as the writers' statements take them (events, then states).
REBUILD_LOCK = "LOCK TABLE optin_event, optin IN EXCLUSIVE MODE"
REBUILD_CLEAR = "DELETE FROM optin_change"
# A new generation, starting after every seq given out so far.
REBUILD_GENERATION = """
UPDATE optin_feed SET generation = substr(md5(random()::text || clock_timestamp()::text), 1, 16),
    pruned_through = coalesce(pg_sequence_last_value('optin_change_seq'), 0)
"""
_PRECEDENCE = "updated_us, status = 'declined', request_id"
REBUILD_CHANGES = f"""
INSERT INTO optin_change ({COLUMNS}, previous, version, appended_us)
SELECT {COLUMNS}, lag(status) OVER member, row_number() OVER member, optin_now_us()
FROM optin_event
WINDOW member AS (PARTITION BY correlation_id ORDER BY {_PRECEDENCE})
ORDER BY correlation_id, {_PRECEDENCE}
"""
# Sets the version only: the triggers watch the event's columns, so none fires.
REBUILD_VERSIONS = """
UPDATE optin SET version = e.events
FROM (SELECT correlation_id, count(*) AS events FROM optin_event GROUP BY correlation_id) AS e
WHERE optin.correlation_id = e.correlation_id AND optin.version <> e.events
"""

# --- the deliverer's state (load_state, save_state) ----------------------------------
# Each is one statement: a compare-and-set re-checks its condition on the row's newest
# version (READ COMMITTED), so of concurrent ones expecting one value, one wins.
STATE_GET = "SELECT value FROM optin_state WHERE key = %s"
STATE_ABSENT = "SELECT NOT EXISTS (SELECT FROM optin_state WHERE key = %s)"
STATE_PUT = (
    "INSERT INTO optin_state (key, value) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
STATE_ADD = (
    "INSERT INTO optin_state (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1"
)
STATE_SWAP = "UPDATE optin_state SET value = %s WHERE key = %s AND value = %s RETURNING 1"
STATE_DELETE = "DELETE FROM optin_state WHERE key = %s"
STATE_DELETE_IF = "DELETE FROM optin_state WHERE key = %s AND value = %s RETURNING 1"
