-- The history read model: every command of a key, read newest first by (key, position).
CREATE TABLE history (
    key         text         NOT NULL,
    position    bigint       NOT NULL,
    event_type  text         NOT NULL,
    value       text         NOT NULL,
    created_at  timestamptz  NOT NULL,
    PRIMARY KEY (key, position)
);

-- Its own exactly-once ledger and watermark (see 0004), so it is applied and rebuilt alone.
CREATE TABLE history_applied (
    command_id  bigint  PRIMARY KEY
);
CREATE TABLE history_applied_watermark (
    singleton  boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    position   bigint   NOT NULL DEFAULT 0,
    pruned     bigint   NOT NULL DEFAULT 0
);
INSERT INTO history_applied_watermark DEFAULT VALUES;
