-- Schema version 2: the change feed (optin_service/feed.py), and the deliverer's state.
--
-- A database upgraded from version 1 keeps every event and state; its states get
-- version 0 and its feed starts empty: it holds the changes written after the
-- upgrade only, until `optin changes rebuild` makes one from the whole history.

-- The member's change count (the feed's `version`): 0 for a state written before
-- the feed existed, 1 for a new member's first state (the column's default from
-- here on), one more for each move (the trigger optin_next_version).
ALTER TABLE optin ADD COLUMN version bigint NOT NULL DEFAULT 0;
ALTER TABLE optin ALTER COLUMN version SET DEFAULT 1;

-- One row per change. seq is taken while the feed's lock is held (optin_feed_lock),
-- so seq order is commit order; it is never given out twice, even once pruned or
-- rebuilt away, so a cursor names one position for the life of the database.
CREATE SEQUENCE optin_change_seq AS bigint;
CREATE TABLE optin_change (
    seq bigint PRIMARY KEY DEFAULT nextval('optin_change_seq'),
    correlation_id text COLLATE "C" NOT NULL,
    updated_us bigint NOT NULL,
    request_id text COLLATE "C" NOT NULL,
    status text NOT NULL,
    source text NOT NULL,
    client text NOT NULL,
    previous text,
    version bigint NOT NULL,
    appended_us bigint NOT NULL  -- the server's clock: what retention compares
);
ALTER SEQUENCE optin_change_seq OWNED BY optin_change.seq;

-- One row: the feed's generation (a rebuild draws a new one, so every earlier
-- cursor expires) and the greatest seq pruned (a cursor below it points into
-- removed changes).
CREATE TABLE optin_feed (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation text NOT NULL,
    pruned_through bigint NOT NULL
);
INSERT INTO optin_feed (generation, pruned_through)
VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16), 0);

-- load_state / save_state: the webhook deliverer's position, lease and flags.
CREATE TABLE optin_state (
    key text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);

-- Commit order. A sequence value is taken before COMMIT, so two writers can commit
-- out of seq order, and a reader that already read the greater seq would skip the
-- smaller one for ever. Every append takes this transaction-level lock first and
-- keeps it to its COMMIT (or ROLLBACK): appends, and the commits that make them
-- visible, happen one at a time in seq order, and any snapshot that holds a change
-- holds every change with a smaller seq that will ever be visible. The key is the
-- feed table's oid, so stores in other schemas of one database do not wait for this one.
CREATE FUNCTION optin_feed_lock() RETURNS void LANGUAGE sql
AS $$ SELECT pg_advisory_xact_lock(1717921124, 'optin_change'::regclass::oid::integer) $$;

CREATE FUNCTION optin_now_us() RETURNS bigint LANGUAGE sql
AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;

-- A move of the state counts one more change.
CREATE FUNCTION optin_next_version() RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

-- The change, appended by the statement that moved the state, under the feed's lock.
CREATE FUNCTION optin_append_change() RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM optin_feed_lock();
    INSERT INTO optin_change (
        correlation_id, updated_us, request_id, status, source, client, previous, version,
        appended_us
    ) VALUES (
        NEW.correlation_id, NEW.updated_us, NEW.request_id, NEW.status, NEW.source,
        NEW.client, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.version,
        optin_now_us()
    );
    RETURN NULL;
END
$$;

-- The functions find the feed's tables in this schema whatever the caller's
-- search_path (pg_temp last: a temporary table cannot stand in for them).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION optin_feed_lock() SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION optin_append_change() SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

-- Every statement that moves a member's state appends the change in that very
-- statement: a PUT's (whatever release wrote it: the statement of schema version 1
-- too), `optin set`, a statement typed by hand. A bulk merge appends its own
-- changes (each member's intermediate events too, which one statement's upsert
-- cannot pass through): its transaction sets optin.bulk_feed, and these stay quiet.
CREATE TRIGGER optin_next_version
BEFORE UPDATE OF updated_us, request_id, status, source, client ON optin
FOR EACH ROW
WHEN (current_setting('optin.bulk_feed', true) IS DISTINCT FROM 'on'
      AND (OLD.updated_us, OLD.request_id, OLD.status, OLD.source, OLD.client)
          IS DISTINCT FROM (NEW.updated_us, NEW.request_id, NEW.status, NEW.source, NEW.client))
EXECUTE FUNCTION optin_next_version();

CREATE TRIGGER optin_first_change
AFTER INSERT ON optin
FOR EACH ROW
WHEN (current_setting('optin.bulk_feed', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION optin_append_change();

CREATE TRIGGER optin_next_change
AFTER UPDATE OF updated_us, request_id, status, source, client ON optin
FOR EACH ROW
WHEN (current_setting('optin.bulk_feed', true) IS DISTINCT FROM 'on'
      AND (OLD.updated_us, OLD.request_id, OLD.status, OLD.source, OLD.client)
          IS DISTINCT FROM (NEW.updated_us, NEW.request_id, NEW.status, NEW.source, NEW.client))
EXECUTE FUNCTION optin_append_change();
