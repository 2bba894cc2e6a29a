-- Schema version 1: the current state, the events, idempotency keys, a health row.
-- Text that is compared or ordered is COLLATE "C": code-point order, as every
-- backend compares request ids for precedence and history, whatever the
-- database's own collation.

-- One row per member: the stored event with the greatest precedence.
CREATE TABLE optin (
    correlation_id text COLLATE "C" PRIMARY KEY,
    updated_us bigint NOT NULL,
    request_id text COLLATE "C" NOT NULL,
    status text NOT NULL CHECK (status IN ('accepted', 'declined')),
    source text NOT NULL,
    client text NOT NULL
) WITH (fillfactor = 90);  -- room for HOT updates: a state changes in place

-- Every event, immutable; the primary key is the history's order (keyset pages).
CREATE TABLE optin_event (
    correlation_id text COLLATE "C" NOT NULL,
    updated_us bigint NOT NULL,
    request_id text COLLATE "C" NOT NULL,
    status text NOT NULL CHECK (status IN ('accepted', 'declined')),
    source text NOT NULL,
    client text NOT NULL,
    PRIMARY KEY (correlation_id, updated_us, request_id)
);

-- Idempotency-Key per member, with when it was first used (µs): valid for 24 h.
CREATE TABLE optin_idempotency (
    correlation_id text COLLATE "C" NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL,
    fingerprint text NOT NULL,
    created_us bigint NOT NULL,
    PRIMARY KEY (correlation_id, idempotency_key)
);
CREATE INDEX optin_idempotency_created ON optin_idempotency (created_us);

-- One row that check() (/readyz) writes, to prove the server takes writes now.
CREATE TABLE optin_health (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    checked_us bigint NOT NULL
);
