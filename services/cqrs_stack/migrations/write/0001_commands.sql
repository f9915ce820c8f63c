-- The write DB: every accepted command, the source of truth.
-- txid records the writing transaction so that the projector's catch-up can find commands
-- that committed late (sequence ids commit out of order under concurrency).
CREATE TABLE commands (
    id          bigserial    PRIMARY KEY,
    key         text         NOT NULL,
    value       text         NOT NULL,
    event_type  text         NOT NULL,
    created_at  timestamptz  NOT NULL DEFAULT clock_timestamp(),
    txid        xid8         NOT NULL DEFAULT pg_current_xact_id(),
    published   boolean      NOT NULL DEFAULT false
);
CREATE INDEX commands_key_idx ON commands (key);
CREATE INDEX commands_txid_idx ON commands (txid);
-- Small by construction: only commands whose event has not reached the stream yet.
CREATE INDEX commands_unpublished_idx ON commands (id) WHERE NOT published;
