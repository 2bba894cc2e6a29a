"""The store's SQL, one named constant per statement.

Columns are listed in :data:`~optin_service.storage.EventRow` order everywhere, so
a row read is an ``EventRow`` as it is.
"""

from __future__ import annotations

COLUMNS = "correlation_id, updated_us, request_id, status, source, client"

# The current state moves only to an event that takes precedence over it: newer;
# as new and declined over accepted; then the greater request id
# (OptInRecord.precedence). Shared by a single write and a bulk merge.
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

# Bulk import: each batch is copied into a temporary stage, then merged in one
# statement. seq keeps the stream's order among rows of one identity (the first
# wins, as when importing one by one).
STAGE = """
CREATE TEMPORARY TABLE optin_staged (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    correlation_id text COLLATE "C", updated_us bigint, request_id text COLLATE "C",
    status text, source text, client text
) ON COMMIT DROP
"""
STAGE_COPY = f"COPY optin_staged ({COLUMNS}) FROM STDIN"
# New events go in oldest first per member; each member's state then moves to its
# newest new event if that takes precedence: the state importing them one by one,
# oldest first, would leave (a member's new events that take precedence over the
# state before the batch are, in precedence order, the changes it went through).
# Returns how many events were new.
MERGE = f"""
WITH new AS (
    INSERT INTO optin_event ({COLUMNS})
    SELECT DISTINCT ON (correlation_id, updated_us, request_id) {COLUMNS}
    FROM optin_staged
    ORDER BY correlation_id, updated_us, request_id, seq
    ON CONFLICT DO NOTHING
    RETURNING {COLUMNS}
), newest AS (
    SELECT DISTINCT ON (correlation_id) {COLUMNS} FROM new
    ORDER BY correlation_id, updated_us DESC, status = 'declined' DESC, request_id DESC
), applied AS ({_APPLY.format(source="newest")})
SELECT count(*) FROM new
"""
