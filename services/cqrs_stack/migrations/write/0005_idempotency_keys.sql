-- Idempotency-Key of writes: one row per key (scoped to the stack), claimed in the transaction
-- that stores the command, so a retry finds the original answer instead of writing again.
-- digest: SHA-256 of the method, the key, the body and the precondition, to tell a retry
-- from a reuse. command_id and version: the command stored; event_id: its stream id once
-- published by the write path (NULL: the original answer said queued). expires_at: set at
-- claim from the IDEMPOTENCY_RETENTION of the process that stored it, so every replica's
-- expiry task removes a key at the same time, whatever its own retention.
CREATE TABLE idempotency_keys (
    key         text         PRIMARY KEY,
    digest      bytea        NOT NULL,
    command_id  bigint,
    version     bigint,
    event_id    text,
    created_at  timestamptz  NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz  NOT NULL
);
-- The expiry task takes the rows past their expiry first, in small batches.
CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);
