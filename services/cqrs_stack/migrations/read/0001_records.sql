-- The read DB: the denormalised read model and the projector's bookkeeping.
CREATE TABLE records (
    key               text         PRIMARY KEY,
    value             text         NOT NULL,
    created_at        timestamptz  NOT NULL,
    updated_at        timestamptz  NOT NULL,
    read_count        bigint       NOT NULL DEFAULT 0,
    write_count       bigint       NOT NULL DEFAULT 0,
    first_command_id  bigint       NOT NULL,
    last_command_id   bigint       NOT NULL
);

-- One row per applied command: the exactly-once ledger. A command is applied only in the
-- transaction that inserts its row here, so duplicates and redeliveries change nothing.
CREATE TABLE applied_commands (
    command_id  bigint  PRIMARY KEY
);

-- Per-consumer progress, one row each so that replicas never contend on a shared row.
CREATE TABLE projector_consumers (
    consumer          text         PRIMARY KEY,
    events_projected  bigint       NOT NULL DEFAULT 0,
    last_position     bigint       NOT NULL DEFAULT 0,
    last_event_at     timestamptz,
    updated_at        timestamptz  NOT NULL DEFAULT now()
);

-- The catch-up watermark: every write-DB transaction with an id below it has been seen.
CREATE TABLE projector_catchup (
    singleton  boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    watermark  xid8     NOT NULL DEFAULT '0'::xid8,
    swept_at   timestamptz
);
INSERT INTO projector_catchup DEFAULT VALUES;
