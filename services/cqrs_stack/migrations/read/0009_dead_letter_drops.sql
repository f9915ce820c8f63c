-- Dead letters dropped by an operator (`cqrs-stack dlq drop`): who dropped which entry, when
-- and why. `entry` holds the entry's fields except the command's value (user data, possibly
-- sensitive): its size and SHA-256 are kept instead, and the value itself stays in the write
-- DB at `position` (when the entry carried a command of ours).
CREATE TABLE dead_letter_drops (
    stream      text         NOT NULL,
    entry_id    text         NOT NULL,
    key         text,
    position    bigint,
    reason      text         NOT NULL,
    dropped_by  text         NOT NULL,
    dropped_at  timestamptz  NOT NULL DEFAULT now(),
    entry       jsonb        NOT NULL,
    PRIMARY KEY (stream, entry_id)
);
CREATE INDEX dead_letter_drops_dropped_at ON dead_letter_drops (dropped_at);
