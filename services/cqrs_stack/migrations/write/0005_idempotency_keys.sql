-- Idempotency-Key of writes: one row per key (scoped to the stack), claimed in the transaction
-- that stores the command, so a retry finds the original answer instead of writing again.
-- digest: SHA-256 of the method, the key and the body, to tell a retry from a reuse.
-- command_id and version: the command stored; event_id: its stream id once published by the
-- write path (NULL: the original answer said queued). Removed after IDEMPOTENCY_RETENTION.
CREATE TABLE idempotency_keys (
    key         text         PRIMARY KEY,
    digest      bytea        NOT NULL,
    command_id  bigint,
    version     bigint,
    event_id    text,
    created_at  timestamptz  NOT NULL DEFAULT clock_timestamp()
);
-- The expiry task takes the oldest rows first, in small batches.
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
